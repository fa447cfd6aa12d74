"""Cross-worker metrics: prometheus_client in multiprocess mode (docs/adr/0006).

Theory of operation
-------------------
The master sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker forks and before anything
imports prometheus_client, which therefore picks its mmap-backed value class. Each worker
then writes its own ``counter_<pid>.db``, ``histogram_<pid>.db`` and ``gauge_live*_<pid>.db``
files; an increment takes an uncontended lock and writes 8 bytes into an mmap (no system
call). Whichever worker answers ``/metrics`` globs and merges all files
(``MultiProcessCollector``), so the figures are the whole gateway's:

* counters and histograms of dead workers stay in the sum (their files stay; a worker
  killed or retired does not make ``requests_total`` drop);
* ``livesum``/``liveall`` gauges (requests and connections in progress, each worker's RSS)
  lose a dead worker's file in the master's ``child_exit`` hook (``mark_process_dead``);
* ``on_starting`` wipes the directory, so a restarted gateway starts from zero.

Without ``PROMETHEUS_MULTIPROC_DIR`` (unit tests, the app under another server) the same
metrics live in a private in-process registry.

Only one ``Metrics`` may exist per process in multiprocess mode: two would each keep their
own copy of a value and overwrite each other's writes to the shared file.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead

from ntonix.core.figures import LATENCY_BUCKETS, OTHER_STATUS, STATUS_CLASSES, TTFT_BUCKETS, Extras

log = logging.getLogger("ntonix.metrics")

# prometheus_client's mmap values call os.getpid() (a system call) on every inc/observe to
# notice a fork. The pid only changes at a fork, so keep it and refresh it there.
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


def _cached_pid() -> int:
    return _pid


class _NoLock:
    """A lock for code that cannot be interleaved anyway (see ``_value_lock``)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _value_lock() -> Any:
    """The lock prometheus_client's mmap values take around every update.

    Under gevent's monkey-patching ``threading.Lock`` is a greenlet lock (~1 µs per
    acquire/release, ~1 % of a worker's samples with half a dozen updates per request), and
    what it would guard never yields: an update writes 8 bytes into an mmap. Greenlets only
    switch when one yields, and the worker's real threads (gevent's resolver pool) never touch
    metrics, so there is nothing to exclude. Without gevent: a real lock.
    """
    if getattr(threading.Lock, "__module__", "").startswith("gevent"):
        return _NoLock()
    return threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
if getattr(_values.ValueClass, "_multiprocess", False):
    _saved_lock = getattr(_values, "Lock")  # noqa: B009 - not exported: mypy would refuse _values.Lock
    setattr(_values, "Lock", _value_lock)  # noqa: B010 - read once, by MultiProcessValue below
    try:
        _values.ValueClass = _values.MultiProcessValue(process_identifier=_cached_pid)  # type: ignore[no-untyped-call]
    finally:
        setattr(_values, "Lock", _saved_lock)  # noqa: B010

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BACKEND_STATES = ("healthy", "unhealthy", "draining", "open", "half_open")


def multiprocess_dir() -> str | None:
    path = os.environ.get(MULTIPROC_ENV)
    return path if path and os.path.isdir(path) else None


def wipe(directory: str) -> int:
    """Remove every metrics file (the master's ``on_starting``): a new gateway starts at 0."""
    removed = 0
    for path in glob.glob(os.path.join(directory, "*.db")):
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def mark_process_dead(pid: int, directory: str | None = None) -> None:
    """The master's ``child_exit``: drop a dead worker's live gauges (counters stay)."""
    path = directory or multiprocess_dir()
    if path:
        _mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


class _BackendMetrics:
    __slots__ = ("errors", "latency", "requests")

    def __init__(self, m: Metrics, address: str) -> None:
        self.requests = m.backend_requests.labels(address)
        self.errors = m.backend_errors.labels(address)
        self.latency = m.backend_latency.labels(address)


class Metrics:
    """The gateway's metric objects of this process, with hot-path children pre-resolved."""

    def __init__(self, directory: str | None = None) -> None:
        if directory and not getattr(_values.ValueClass, "_multiprocess", False):
            # prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set: every
            # worker would only see itself. A deployment bug; say so and keep serving.
            log.error("metrics.not_multiprocess", extra={"dir": directory, "reason": (
                "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set; "
                "/metrics shows this worker only")})
            directory = None
        self.directory = directory or None
        reg = None if directory else CollectorRegistry()
        self._registry = reg
        self.requests = Counter(
            "ntonix_requests", "HTTP requests received by the gateway (its own endpoints included), "
            "counted on arrival", registry=reg)
        self.responses = Counter(
            "ntonix_responses", "Requests finished, by status class", ["status_class"], registry=reg)
        self.requests_active = Gauge(
            "ntonix_requests_active", "Requests in progress", registry=reg, multiprocess_mode="livesum")
        self.connections_active = Gauge(
            "ntonix_connections_active", "Open client connections", registry=reg, multiprocess_mode="livesum")
        self.worker_rss = Gauge(
            "ntonix_worker_rss_bytes", "Resident memory of each live worker (last reading)", registry=reg,
            multiprocess_mode="liveall")
        self.cache_hits = Counter(
            "ntonix_cache_hits", "Requests answered from the cache (X-Cache: HIT)", registry=reg)
        self.cache_misses = Counter(
            "ntonix_cache_misses", "Cacheable requests not found in the cache (X-Cache: MISS)", registry=reg)
        self.cache_bypasses = Counter(
            "ntonix_cache_bypasses", "Requests that did not use the cache (X-Cache: BYPASS)", registry=reg)
        self.protocol_errors = Counter(
            "ntonix_protocol_errors", "Connections the HTTP layer answered itself: malformed requests "
            "(4xx) or an unhandled error (500)", registry=reg)
        self.request_duration = Histogram(
            "ntonix_request_duration_seconds", "Time from a request's arrival to the end of its answer",
            registry=reg, buckets=LATENCY_BUCKETS)
        self.stream_ttft = Histogram(
            "ntonix_stream_ttft_seconds", "Streamed answers: time from the request's arrival to the first "
            "body byte sent", registry=reg, buckets=TTFT_BUCKETS)
        self.backend_requests = Counter(
            "ntonix_backend_requests", "Requests sent to a backend (attempts, retries included)", ["backend"],
            registry=reg)
        self.backend_errors = Counter(
            "ntonix_backend_errors", "Backend attempts that failed (not sent, timeout, broken body, 5xx)",
            ["backend"], registry=reg)
        self.backend_latency = Histogram(
            "ntonix_backend_latency_seconds", "Time to a backend's response headers (good answers)",
            ["backend"], registry=reg, buckets=LATENCY_BUCKETS)
        self.tokens = Counter(
            "ntonix_tokens", "Tokens of backend answers (their usage), by kind: prompt (all, cached "
            "included), completion, cached_prompt", ["model", "backend", "kind"], registry=reg)
        self.cache_tokens_saved = Counter(
            "ntonix_cache_tokens_saved", "Tokens of answers served from the gateway's cache (X-Cache: HIT), "
            "which no backend had to process", ["model", "kind"], registry=reg)
        self.cluster_flights = Counter(
            "ntonix_cluster_flights", "Coalescing across gateways (cache.redis_url), by outcome: led, followed, "
            "alone (Redis unavailable or too many followers), hits (the cache's re-check in the join), detached, "
            "leader_failed, redis_errors, batched_finishes", ["outcome"], registry=reg)
        self.cluster_affinity = Counter(
            "ntonix_cluster_affinity", "The shared view of prefix affinity (routing.policy prefix): assignments "
            "published to and merged from the other gateways, and Redis errors", ["event"], registry=reg)
        self.cluster_available = Gauge(
            "ntonix_cluster_redis_available", "1 while every live worker reaches the cluster's Redis, 0 while one "
            "backs off after a failure (absent without cache.redis_url)", ["redis"], registry=reg,
            multiprocess_mode="livemin")
        self._status = {cls: self.responses.labels(cls) for cls in (*STATUS_CLASSES, OTHER_STATUS)}
        self._backends: dict[str, _BackendMetrics] = {}

    @property
    def multiprocess(self) -> bool:
        return self.directory is not None

    def status(self, cls: str) -> Counter:
        return self._status[cls]

    def backend(self, address: str) -> _BackendMetrics:
        found = self._backends.get(address)
        if found is None:
            found = self._backends[address] = _BackendMetrics(self, address)
        return found

    def collect(self) -> list[Metric]:
        """Every process's samples merged (multiprocess) or this process's own."""
        if self.directory is not None:
            return list(MultiProcessCollector.merge(self._files(), accumulate=True))  # type: ignore[no-untyped-call]
        assert self._registry is not None
        return list(self._registry.collect())

    def _files(self) -> list[str]:
        """The metrics files with something in them. A worker that is just starting creates its
        file empty and sizes it a moment later; prometheus_client's own collector fails on such
        a file (struct.error), so it is skipped: it holds no values yet, and files never shrink."""
        out = []
        for path in glob.glob(os.path.join(self.directory or "", "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    out.append(path)
            except FileNotFoundError:  # a dead worker's live gauges, just removed
                pass
        return out

    def file_count(self) -> int:
        return len(self._files()) if self.directory else 0


def extra_families(extras: Extras, memory_rss_bytes: int, workers: int) -> list[Metric]:
    """The figures the answering worker computes rather than reads from the shared files."""
    uptime = GaugeMetricFamily("ntonix_uptime_seconds", "Seconds since the gateway (its master) started",
                               value=extras.uptime_s)
    memory = GaugeMetricFamily("ntonix_memory_rss_bytes", "Resident memory of the master and all live workers",
                               value=memory_rss_bytes)
    count = GaugeMetricFamily("ntonix_workers", "Live worker processes", value=workers)
    state = GaugeMetricFamily("ntonix_backend_state", "1 for each backend's current state (as the answering "
                              "worker sees it), 0 for the others", labels=["backend", "state"])
    for address, current in extras.backends:
        for name in (*BACKEND_STATES, *(() if current in BACKEND_STATES else (current,))):
            state.add_metric([address, name], 1.0 if name == current else 0.0)
    in_flight = GaugeMetricFamily("ntonix_backend_in_flight", "Requests in flight to each backend from this "
                                  "host, all workers", labels=["backend"])
    queued = GaugeMetricFamily("ntonix_backend_queued", "Requests of this host waiting for a place on each "
                               "backend (max_in_flight)", labels=["backend"])
    for address, (flying, waiting) in extras.load.items():
        in_flight.add_metric([address], float(flying))
        queued.add_metric([address], float(waiting))
    return [uptime, memory, count, state, in_flight, queued]


class _Families:
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def prometheus_text(families: Sequence[Metric]) -> bytes:
    """The text exposition format (0.0.4) of ``families``."""
    return generate_latest(_Families(families))


__all__ = ["Metrics", "extra_families", "mark_process_dead", "multiprocess_dir", "prometheus_text", "wipe"]
