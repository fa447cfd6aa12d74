"""Background greenlets of a worker: active health checks and model discovery (the request
side's are in ``background.py``).

Every worker probes every backend each ``health.interval_s`` (with a little jitter so the
workers do not probe in lock-step), on fresh connections outside the request pools, so
a probe never waits behind traffic. See docs/adr/0005-health-check-placement.md.

Backends without a configured ``models`` list are asked for their ``GET /v1/models`` at start,
every ``MODELS_EVERY_S`` after that, and at once after a reload (``discover_soon``), whether
health checks are enabled or not.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import gevent
import gevent.event
import gevent.pool

from ntonix.config import HealthConfig
from ntonix.core.registry import Backend, Registry
from ntonix.upstream import transport

log = logging.getLogger("ntonix.health")

MODELS_EVERY_S = 30.0  # model lists change when an operator loads a model: rarely
MODELS_TIMEOUT_S = 5.0


class Prober:
    def __init__(self, registry: Registry, health: Callable[[], HealthConfig],
                 on_result: Callable[[Backend, bool, str], None],
                 on_models: Callable[[Backend, tuple[int, bytes] | None], None] | None = None) -> None:
        """``health`` gives the current settings (they change on reload); ``on_result`` gets
        each probe's verdict for a backend still configured; ``on_models`` each discovery's
        answer (status, body), or None when the backend could not be reached."""
        self._registry = registry
        self._health = health
        self._on_result = on_result
        self._on_models = on_models
        self._greenlet: gevent.Greenlet[..., None] | None = None
        self._models_at = -MODELS_EVERY_S
        self._wake = gevent.event.Event()
        self._discovery: gevent.Greenlet[..., None] | None = None

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
        if self._discovery is not None:
            self._discovery.kill(block=False)
            self._discovery = None

    def probe_all(self) -> None:
        cfg = self._health()
        backends = list(self._registry.backends.values())
        group = gevent.pool.Group()
        for backend in backends:
            group.spawn(self._probe_one, backend, cfg.path, cfg.timeout_s)
        group.join(timeout=cfg.timeout_s + 1.0)
        group.kill(block=False)

    def discover_all(self) -> None:
        """Ask every backend without a configured list for its ``GET /v1/models``."""
        if self._on_models is None:
            return
        group = gevent.pool.Group()
        for backend in self._registry.learning():
            group.spawn(self._discover_one, backend)
        group.join(timeout=MODELS_TIMEOUT_S + 1.0)
        group.kill(block=False)

    def _discover_round(self) -> None:
        try:
            self.discover_all()
        except Exception:  # noqa: BLE001 - a failed round must not end discovery
            log.exception("models.round_failed")

    def discover_soon(self) -> None:
        """After a reload: discover at once (new backends, lists no longer configured)."""
        self._models_at = -MODELS_EVERY_S
        self._wake.set()

    def _discover_one(self, backend: Backend) -> None:
        answer = transport.fetch_models(backend.config.host, backend.config.port, MODELS_TIMEOUT_S)
        if self._on_models is not None and not backend.removed:
            self._on_models(backend, answer)

    def _probe_one(self, backend: Backend, path: str, timeout_s: float) -> None:
        ok, reason = transport.probe(backend.config.host, backend.config.port, path, timeout_s)
        # A probe still running when a HUP switched checks off must not mark the backend
        # unhealthy again (nothing could bring it back: the reload made it healthy).
        if not backend.removed and self._health().enabled:
            self._on_result(backend, ok, reason)

    def _run(self) -> None:
        while True:
            cfg = self._health()
            now = time.monotonic()
            if now - self._models_at >= MODELS_EVERY_S and (self._discovery is None or self._discovery.dead):
                self._models_at = now
                # Beside the health round, not before it: a backend slow to list its models
                # must not delay the health checks.
                self._discovery = gevent.spawn(self._discover_round)
            if cfg.enabled:
                try:
                    self.probe_all()
                except Exception:  # noqa: BLE001 - a failed round must not end health checking
                    log.exception("health.round_failed")
            self._wake.clear()
            self._wake.wait(cfg.interval_s * random.uniform(0.9, 1.1))
