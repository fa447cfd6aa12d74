"""Background greenlets of a worker: active health checks (the request side's are in ``background.py``).

Every worker probes every backend each ``health.interval_s`` (with a little jitter so the
workers do not probe in lock-step), on fresh connections outside the request pools, so
a probe never waits behind traffic. See docs/adr/0005-health-check-placement.md.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import gevent
import gevent.pool

from ntonix.config import HealthConfig
from ntonix.core.registry import Backend, Registry
from ntonix.upstream import transport

log = logging.getLogger("ntonix.health")


class Prober:
    def __init__(self, registry: Registry, health: Callable[[], HealthConfig],
                 on_result: Callable[[Backend, bool, str], None]) -> None:
        """``health`` gives the current settings (they change on reload); ``on_result`` gets
        each probe's verdict for a backend still configured."""
        self._registry = registry
        self._health = health
        self._on_result = on_result
        self._greenlet: gevent.Greenlet[..., None] | None = None

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def probe_all(self) -> None:
        cfg = self._health()
        backends = list(self._registry.backends.values())
        group = gevent.pool.Group()
        for backend in backends:
            group.spawn(self._probe_one, backend, cfg.path, cfg.timeout_s)
        group.join(timeout=cfg.timeout_s + 1.0)
        group.kill(block=False)

    def _probe_one(self, backend: Backend, path: str, timeout_s: float) -> None:
        ok, reason = transport.probe(backend.config.host, backend.config.port, path, timeout_s)
        if not backend.removed:
            self._on_result(backend, ok, reason)

    def _run(self) -> None:
        while True:
            cfg = self._health()
            if cfg.enabled:
                try:
                    self.probe_all()
                except Exception:  # noqa: BLE001 - a failed round must not end health checking
                    log.exception("health.round_failed")
            gevent.sleep(cfg.interval_s * random.uniform(0.9, 1.1))
