"""What a request needs at run time, swapped in place on reload: config, backends, cache, telemetry.

``Runtime`` owns the registry of backends and their pools, the cache tiers, the coalescer and
the trusted networks, and turns backend outcomes into breaker and health verdicts (logging the
transitions the pure state machines return).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ntonix.cache import ResponseCache, build_cache
from ntonix.cache.coalescer import Coalescer
from ntonix.config import Config
from ntonix.config.handover import run_dir
from ntonix.core.headers import parse_networks
from ntonix.core.health import HealthState
from ntonix.core.registry import Backend, Registry
from ntonix.core.transitions import Transition
from ntonix.telemetry.recorder import Telemetry
from ntonix.upstream import transport

log = logging.getLogger("ntonix.gateway")


class Runtime:
    """Everything a request needs, swapped in place on reload."""

    def __init__(self, config: Config, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.registry = Registry(config.backends, config.health, config.circuit_breaker)
        for backend in self.registry.all():
            self._attach_pool(backend)
        self.trusted_proxies = parse_networks(config.proxy.trusted_proxies)
        self.metrics_allow = parse_networks(config.metrics.allow)
        cache_dir = config.cache.dir or os.path.join(run_dir(), "cache")
        self.cache: ResponseCache | None = build_cache(
            enabled=config.cache.enabled, max_bytes=int(config.cache.max_size_mb * 1024 * 1024),
            ttl_s=config.cache.ttl_seconds, directory=cache_dir, redis_url=config.cache.redis_url or None,
            memory_max_bytes=int(min(config.cache.memory_max_mb, config.cache.max_size_mb / 4) * 1024 * 1024))
        self.coalescer: Coalescer | None = (
            Coalescer(cache_dir, stale_after_s=max(10.0, config.proxy.read_timeout_s),
                      max_bytes=config.cache.max_entry_bytes, lazy=True)
            if config.cache.enabled else None)
        self.started = time.time()

    def _attach_pool(self, backend: Backend) -> None:
        cfg = self.config
        backend.pool = transport.Pool(
            backend.config.host, backend.config.port, size=cfg.pool.size, max_size=cfg.pool.max_size,
            idle_timeout_s=cfg.pool.idle_timeout_s, connect_timeout_s=cfg.proxy.connect_timeout_s)

    def backend_states(self) -> list[tuple[str, str]]:
        """(address, state) of every backend, draining ones included, for ``/metrics``."""
        return [(b.address, b.state) for b in self.registry.all()]

    # ------------------------------------------------------------------ outcomes
    def log_change(self, backend: Backend, kind: str, change: Transition[Any] | None) -> None:
        if change is None:
            return
        old = getattr(change.old, "value", change.old)
        new = getattr(change.new, "value", change.new)
        level = logging.WARNING if new in ("unhealthy", "open") else logging.INFO
        log.log(level, f"backend.{kind}_changed", extra={
            "backend": backend.address, "old_state": old, "new_state": new, "reason": change.reason})

    def backend_failed(self, backend: Backend, reason: str) -> None:
        self.log_change(backend, "breaker", backend.breaker.record_failure(reason))
        self.telemetry.backend_result(backend.address, ok=False, latency_ms=None)

    def backend_succeeded(self, backend: Backend, latency_ms: float) -> None:
        self.log_change(backend, "breaker", backend.breaker.record_success())
        self.telemetry.backend_result(backend.address, ok=True, latency_ms=latency_ms)

    def probe_result(self, backend: Backend, ok: bool, reason: str) -> None:
        change = backend.health.record_probe(ok, reason)
        self.log_change(backend, "health", change)
        if change is not None and change.new is HealthState.HEALTHY:
            # Probes saw it come back: let traffic in now rather than after the breaker's cooldown.
            self.log_change(backend, "breaker", backend.breaker.recovered("active health checks passed"))

    # ------------------------------------------------------------------ reload
    def reload(self, config: Config) -> None:
        """Apply a new configuration in place: backends added, kept or drained."""
        added, removed, changes = self.registry.reload(config.backends, config.health, config.circuit_breaker)
        self.config = config
        self.telemetry.reload(config)
        for backend in added:
            self._attach_pool(backend)
        for change in changes:
            backend = next(b for b in self.registry.all() if b.address == change.backend)
            self.log_change(backend, change.kind, change.transition)
        self.trusted_proxies = parse_networks(config.proxy.trusted_proxies)
        self.metrics_allow = parse_networks(config.metrics.allow)
        log.info("config.reloaded", extra={
            "backends": [b.address for b in self.registry.backends.values()],
            "added": [b.address for b in added], "removed": [b.address for b in removed]})
        self.reap_drained()

    def reap_drained(self) -> None:
        for backend in self.registry.finished_draining():
            if backend.pool is not None:
                backend.pool.close()
            log.info("backend.drained", extra={"backend": backend.address})
