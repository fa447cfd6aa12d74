"""The health prober (ntonix.upstream.prober): what it does with a probe's result."""

from __future__ import annotations

from typing import Any

import pytest

from ntonix.config.model import BackendConfig, CircuitBreakerConfig, HealthConfig
from ntonix.core.registry import Registry
from ntonix.upstream import prober as prober_module
from ntonix.upstream.prober import Prober
from tests.fakes import FakeClock


@pytest.mark.parametrize("enabled", [True, False])
def test_a_probe_that_ends_after_checks_were_switched_off_is_ignored(monkeypatch: pytest.MonkeyPatch,
                                                                      enabled: bool) -> None:
    # The review: a round still running at a HUP that switched checks off marked the backend
    # (just made healthy by the reload) unhealthy again, for good: no probe would follow.
    registry = Registry([BackendConfig("10.0.0.1", 1, 1)], HealthConfig(), CircuitBreakerConfig(), clock=FakeClock())
    backend = registry.backends["10.0.0.1:1"]
    settings = {"health": HealthConfig(enabled=True)}
    results: list[tuple[Any, bool, str]] = []

    def probe(host: str, port: int, path: str, timeout_s: float) -> tuple[bool, str]:
        settings["health"] = HealthConfig(enabled=enabled)  # the HUP lands while the probe waits
        return False, "timed out"

    monkeypatch.setattr(prober_module.transport, "probe", probe)
    p = Prober(registry, lambda: settings["health"], lambda b, ok, why: results.append((b, ok, why)))
    p._probe_one(backend, "/health", 1.0)
    assert results == ([(backend, False, "timed out")] if enabled else [])
