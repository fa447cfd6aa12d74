"""What a request needs at run time, swapped in place on reload: config, backends, cache, telemetry.

``Runtime`` owns the registry of backends and their pools, the routing state (policy, host-wide
in-flight counts, prefix index), the cache tiers, the coalescer and the trusted networks, holds
the ``Transport`` to the backends (given by the composition root: the real one in a worker,
``ntonix.upstream.fake.ScriptedTransport`` in unit tests), and turns
backend outcomes into breaker and health verdicts (logging the transitions the pure state
machines return).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ntonix.cache import ResponseCache, build_cache
from ntonix.cache.coalescer import Coalescer
from ntonix.cluster.affinity import AffinityBoard, host_id
from ntonix.cluster.flights import Flights
from ntonix.config import Config
from ntonix.config.handover import run_dir
from ntonix.core.attempt import Attempt
from ntonix.core.headers import parse_networks
from ntonix.core.health import HealthState
from ntonix.core.models import ModelList, model_not_found, next_models, union_models
from ntonix.core.redis_url import redacted
from ntonix.core.registry import Backend, Registry
from ntonix.core.transitions import Transition
from ntonix.routing.select import Lease
from ntonix.routing.state import RoutingState
from ntonix.telemetry.recorder import Telemetry
from ntonix.upstream import Transport
from ntonix.upstream.background import Background

log = logging.getLogger("ntonix.gateway")

REAP_EVERY_S = 5.0  # how often a worker frees the routing slots of dead workers


def _sleep(seconds: float) -> None:
    # Looked up at each call: in a worker, gevent has patched time.sleep by then (a queued
    # request must yield to the hub, not block it).
    time.sleep(seconds)


# How stale another gateway's prefix assignments and load may be here (ADR 0009, option c): far
# under a chat turn (its answer takes seconds), so the gateways' views of the backends' load
# agree (the routing benchmark's two gateways: 1.05-1.09 × one's prefill at 0.1 s, 1.00-1.08 ×
# at 0.05 s, docs/routing-benchmark.md). One round trip per worker per tick while the host has
# requests in flight, one a second while idle (ntonix/cluster/affinity.py), off the request path.
AFFINITY_SYNC_S = 0.05


class Runtime:
    """Everything a request needs, swapped in place on reload."""

    def __init__(self, config: Config, telemetry: Telemetry, transport: Transport,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: the breakers' (tests pass a fake one)."""
        self.config = config
        self.telemetry = telemetry
        self.transport = transport
        self.background = Background()  # greenlets no connection holds; the worker joins them at drain
        self.registry = Registry(config.backends, config.health, config.circuit_breaker, clock=clock)
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
            # Leaders start unregistered (ntonix/cache/board.py): a miss nobody follows writes
            # nothing to the coalescing journal (ntonix/cache/coalescer.py, "The handshake").
            Coalescer(cache_dir, stale_after_s=max(10.0, config.proxy.read_timeout_s),
                      max_bytes=config.cache.max_entry_bytes, lazy=True)
            if config.cache.enabled else None)
        self.routing = RoutingState(config, run_dir(), sleep=_sleep)
        self._reaped_at = time.monotonic()
        # Coalescing across the gateways sharing cache.redis_url (ADR 0009). Only beside the
        # host's coalescer: a cluster acts as one gateway would, and one gateway with its cache
        # off coalesces nothing (INTERFACE.md "Several gateways"; docs/scale-out.md).
        self.flights: Flights | None = (
            Flights(config.cache.redis_url, max_bytes=config.cache.max_entry_bytes)
            if self.coalescer is not None and config.cache.redis_url else None)
        if self.cache is not None and self.coalescer is not None and self.flights is None:
            # Every L2 write moves the board's store counter (ntonix/cache/board.py); across
            # gateways the join always looks again (with Redis, in the same round trip).
            self.cache.on_stored = self.coalescer.stored
        self.affinity: AffinityBoard | None = None
        self._merge: Callable[[list[int], str], None] | None = None
        self._stopped = False
        self._redis_url = config.cache.redis_url  # cache.* takes effect after a restart
        self._spawn: Callable[[Callable[[], None]], object] | None = None
        self._sleep: Callable[[float], object] = time.sleep
        # Runs a callable once the current greenlet yields, before the loop polls again (the
        # gevent loop's run_callback in a worker; None elsewhere: stores are written at once).
        self.defer: Callable[[Callable[[], None]], object] | None = None
        self.share_routing(self.routing)
        self.started = time.time()

    def share_routing(self, state: RoutingState) -> None:
        """With ``routing.policy: prefix`` and ``cache.redis_url``: this worker's new prefix
        assignments go to the other gateways, theirs into this host's index, in the background
        (ntonix/cluster/affinity.py; whether or not the cache is enabled, INTERFACE.md "Several
        gateways"). The composition root calls this once it built the routing state."""
        cfg = self.config
        if cfg.routing.policy != "prefix" or not self._redis_url:
            return
        if self.affinity is not None:
            self.affinity.close()
        board = self.affinity = AffinityBoard(self._redis_url, host=host_id(run_dir()))
        selector = state.selector
        selector.share = board.share
        self._merge = state.merge
        # The host's in-flight counts out, the other gateways' in: the policy then weighs the
        # backends' whole load, as one gateway would (ntonix/cluster/affinity.py, "Load").
        board.local_load = lambda: {address: n for address, (n, _queued) in selector.load.snapshot().items()}

        def take_remote(remote: dict[str, int]) -> None:
            selector.remote = remote

        board.on_remote = take_remote

    def start(self, spawn: Callable[[Callable[[], None]], object],
              sleep: Callable[[float], object] = time.sleep,
              defer: Callable[[Callable[[], None]], object] | None = None,
              lock: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        """Background work of a serving worker (``spawn`` starts a greenlet; ``sleep`` is
        gevent's in a worker, where time.sleep is patched to it; ``defer`` the loop's
        ``run_callback``, which batches the cache's L2 writes; ``lock`` gevent's lock type in a
        worker, for the cluster's leaders, which then take one only once followed): the cluster's keeper, which
        renews this process's leases and batches its finishes; the affinity and load sync, every
        ``AFFINITY_SYNC_S``."""
        flights = self.flights
        if flights is not None:
            flights.spawn = spawn
            flights.auto_pipeline = True
            if lock is not None:
                flights.lock, flights.cooperative = lock, True
            self.telemetry.watch_cluster(redacted(flights.url), flights.stats, self._redis_reachable)
        elif self._redis_url:
            # The cache off, Redis for prefix routing only (now or after a reload): the gauge
            # follows the board's syncs.
            self.telemetry.watch_cluster(redacted(self._redis_url), {}, self._redis_reachable)
        self._spawn, self._sleep, self.defer = spawn, sleep, defer
        self._run_affinity()

    def fresh_view(self) -> None:
        """Before a routing decision: the other gateways' load, if this host idled (prefix
        routing with several gateways; ntonix/cluster/affinity.py ``refresh``)."""
        board = self.affinity
        if board is not None:
            board.refresh(AFFINITY_SYNC_S)

    def _redis_reachable(self) -> bool:
        """Both users of the cluster's Redis reached it last time they tried (the gauge)."""
        flights, board = self.flights, self.affinity
        return (flights is None or flights.reachable) and (board is None or board.reachable)

    def _run_affinity(self) -> None:
        """The affinity and load sync of the current board, until the worker stops or a reload
        replaces or ends the board."""
        board, merge, spawn, sleep = self.affinity, self._merge, self._spawn, self._sleep
        if board is not None and merge is not None and spawn is not None:
            self.telemetry.watch_affinity(board.stats)
            spawn(lambda: board.run(board.merger(merge), AFFINITY_SYNC_S, sleep,
                                    lambda: self._stopped or self.affinity is not board))

    def _reshare(self) -> None:
        """After a reload: start sharing prefix assignments and load with the other gateways when
        the policy became ``prefix``, stop when it is no longer (INTERFACE.md: every routing key
        can change on HUP)."""
        wanted = self.config.routing.policy == "prefix" and bool(self._redis_url)
        if wanted == (self.affinity is not None):
            return
        if wanted:
            self.share_routing(self.routing)
            self._run_affinity()
            return
        board, self.affinity, self._merge = self.affinity, None, None
        selector = self.routing.selector
        selector.share = None
        selector.remote = {}
        if board is not None:
            board.close()

    def close(self) -> None:
        """At worker exit: answers still queued for L2 written; Redis connections closed; the
        keeper and the affinity sync stop."""
        self._stopped = True
        if self.cache is not None:
            self.cache.flush()
        if self.flights is not None:
            self.flights.close()
        if self.affinity is not None:
            self.affinity.close()

    def _attach_pool(self, backend: Backend) -> None:
        cfg = self.config
        backend.pool = self.transport.pool(
            backend.config.host, backend.config.port, size=cfg.pool.size, max_size=cfg.pool.max_size,
            idle_timeout_s=cfg.pool.idle_timeout_s, connect_timeout_s=cfg.proxy.connect_timeout_s)

    def backend_states(self) -> list[tuple[str, str]]:
        """(address, state) of every backend, draining ones included, for ``/metrics``."""
        return [(b.address, b.state) for b in self.registry.all()]

    # ------------------------------------------------------------------ models and routing
    def serving(self, model: str | None) -> list[Backend]:
        """The backends that serve ``model`` (routable or not); ``ModelNotFound`` (404) when none does."""
        backends = self.registry.serving(model)
        if not backends and model is not None and self.registry.backends:
            raise model_not_found(model)
        return backends

    def known_models(self) -> ModelList | None:
        """The union of the routable backends' known lists; None while none is known."""
        return union_models(b.models for b in self.registry.backends.values() if b.eligible)

    def models_result(self, backend: Backend, answer: tuple[int, bytes] | None) -> None:
        """One discovery attempt (``GET /v1/models``): (status, body), or None when unreachable."""
        if backend.config.models is not None or backend.removed:
            return  # configured meanwhile (HUP), or gone
        models = next_models(backend.models, answer)
        if (None if models is None else list(models)) != (None if backend.models is None else list(backend.models)):
            log.info("backend.models_changed", extra={
                "backend": backend.address, "models": None if models is None else list(models)})
        backend.models = models

    def backend_load(self) -> dict[str, tuple[int, int]]:
        """``{address: (in flight, queued)}`` over all workers of the host, for ``/metrics``."""
        return self.routing.selector.load.snapshot()

    def tick(self) -> None:
        """From the worker's main loop: close idle backend connections past their time (even
        with no request coming: pool.idle_timeout_s), free the routing slots of workers that died."""
        for backend in self.registry.all():
            if backend.pool is not None:
                backend.pool.expire_idle()
        if self.flights is not None:
            self.flights.probe()
        now = time.monotonic()
        if now - self._reaped_at >= REAP_EVERY_S:
            self._reaped_at = now
            reaped = self.routing.selector.load.reap()
            if reaped:
                log.info("routing.slots_reaped", extra={"slots": reaped})

    # ------------------------------------------------------------------ outcomes
    def log_change(self, backend: Backend, kind: str, change: Transition[Any] | None) -> None:
        if change is None:
            return
        old = getattr(change.old, "value", change.old)
        new = getattr(change.new, "value", change.new)
        level = logging.WARNING if new in ("unhealthy", "open") else logging.INFO
        log.log(level, f"backend.{kind}_changed", extra={
            "backend": backend.address, "old_state": old, "new_state": new, "reason": change.reason})

    def attempt(self, backend: Backend, lease: Lease) -> Attempt | None:
        """Start a request on ``backend``: None when its breaker refused (the lease is then
        given back). The attempt gives the lease back when it settles (ntonix/core/attempt.py)."""
        attempt, change = Attempt.start(backend, lease.release)
        self.log_change(backend, "breaker", change)
        return attempt

    def backend_failed(self, attempt: Attempt, reason: str) -> None:
        backend = attempt.backend
        self.log_change(backend, "breaker", attempt.failed(reason))
        self.telemetry.backend_result(backend.address, ok=False, latency_ms=None)

    def backend_succeeded(self, attempt: Attempt, latency_ms: float) -> None:
        backend = attempt.backend
        self.log_change(backend, "breaker", attempt.succeeded())
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
        self.routing.apply(config)
        self._reshare()
        log.info("config.reloaded", extra={
            "backends": [b.address for b in self.registry.backends.values()],
            "added": [b.address for b in added], "removed": [b.address for b in removed]})
        self.reap_drained()

    def reap_drained(self) -> None:
        for backend in self.registry.finished_draining():
            if backend.pool is not None:
                backend.pool.close()
            log.info("backend.drained", extra={"backend": backend.address})
