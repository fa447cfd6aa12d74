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

import bisect
import glob
import logging
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead

from ntonix.core.figures import LATENCY_BUCKETS, OTHER_STATUS, STATUS_CLASSES, TTFT_BUCKETS, Extras
from ntonix.pid import Process

log = logging.getLogger("ntonix.metrics")


def _cached_pid() -> int:
    """prometheus_client's mmap values call os.getpid() (a system call) on every inc/observe
    to notice a fork; ntonix/pid.py refreshes its copy at a fork."""
    return Process.pid


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


if getattr(_values.ValueClass, "_multiprocess", False):
    _saved_lock = getattr(_values, "Lock")  # noqa: B009 - not exported: mypy would refuse _values.Lock
    setattr(_values, "Lock", _value_lock)  # noqa: B010 - read once, by MultiProcessValue below
    try:
        _values.ValueClass = _values.MultiProcessValue(process_identifier=_cached_pid)  # type: ignore[no-untyped-call]
    finally:
        setattr(_values, "Lock", _saved_lock)  # noqa: B010

_PACK_SLOT = struct.Struct("dd").pack_into  # an mmap slot of prometheus_client: value, timestamp


class Incrementer(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class _Slot:
    """One multiprocess value's ``inc``, written straight into its mmap slot.

    prometheus_client's own path (``Counter.inc`` → ``MmapedValue.inc`` → ``write_value``)
    checks the pid, takes the lock and looks the slot up by key on every call: ~1.5 µs, a
    dozen calls a proxied request (3.4 % of a cache miss, 6.7 % of the stripped gateway's,
    py-spy). This keeps the value object's own copy in step (so its other methods stay
    right) and finds the slot once; its position never changes, only the map can be
    replaced when the file grows, so the map is looked up on each call. In a process other
    than the one that made it (a fork), it hands over to the value's own ``inc``.
    """

    __slots__ = ("_file", "_pid", "_pos", "_slow", "_value")

    def __init__(self, value: Any) -> None:
        self._value = value
        self._slow = value.inc
        self._file = value._file
        self._file.write_value(value._key, value._value, value._timestamp)  # the slot exists
        self._pos = self._file._positions[value._key]
        self._pid = Process.pid

    def inc(self, amount: float = 1) -> None:
        if self._pid != Process.pid:
            self._slow(amount)
            return
        v = self._value
        v._value += amount
        v._timestamp = 0.0
        _PACK_SLOT(self._file._m, self._pos, v._value, 0.0)


class _FastCounter:
    """A counter's or gauge's child with ``inc`` (and ``dec``) through a :class:`_Slot`."""

    __slots__ = ("_slot", "inc")

    def __init__(self, slot: _Slot) -> None:
        self._slot = slot
        self.inc = slot.inc

    def dec(self, amount: float = 1) -> None:
        self._slot.inc(-amount)


class _FastHistogram:
    """A histogram child's ``observe``: the sum and one bucket (found by bisection), each
    through a :class:`_Slot`; the same slots prometheus_client's ``observe`` writes."""

    __slots__ = ("_bounds", "_buckets", "_slow", "_sum")

    def __init__(self, child: Any) -> None:
        self._bounds = list(child._upper_bounds)  # ends with +Inf: every number has a bucket
        self._buckets = [_Slot(b) for b in child._buckets]
        self._sum = _Slot(child._sum)
        self._slow = child.observe

    def observe(self, amount: float) -> None:
        if amount != amount:  # NaN: no bucket, as prometheus_client's own loop
            self._slow(amount)
            return
        self._sum.inc(amount)
        self._buckets[bisect.bisect_left(self._bounds, amount)].inc(1)


def _mmaped(value: Any) -> bool:
    return getattr(type(value), "_multiprocess", False) and hasattr(value, "_file")


def fast_counter(child: Any) -> Any:
    """``child`` (a counter's or gauge's labelled child, or an unlabelled one) with the same
    ``inc``/``dec``, writing straight to its mmap slot in multiprocess mode."""
    value = getattr(child, "_value", None)
    return _FastCounter(_Slot(value)) if _mmaped(value) else child


def fast_histogram(child: Any) -> Any:
    """``child`` (a histogram's child) with the same ``observe``, as :func:`fast_counter`."""
    return _FastHistogram(child) if _mmaped(getattr(child, "_sum", None)) else child


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
        self.requests: Incrementer = fast_counter(m.backend_requests.labels(address))
        self.errors: Incrementer = fast_counter(m.backend_errors.labels(address))
        self.latency: Observer = fast_histogram(m.backend_latency.labels(address))


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
            "published to and merged from the other gateways, in-flight counts exchanged with them (load_syncs), "
            "and Redis errors", ["event"], registry=reg)
        self.cluster_available = Gauge(
            "ntonix_cluster_redis_available", "1 while every live worker reaches the cluster's Redis, 0 from a "
            "worker's failed command until one succeeds (idle workers ping every second; absent without "
            "cache.redis_url)", ["redis"], registry=reg,
            multiprocess_mode="livemin")
        self._status: dict[str, Incrementer] = {
            cls: fast_counter(self.responses.labels(cls)) for cls in (*STATUS_CLASSES, OTHER_STATUS)}
        self._backends: dict[str, _BackendMetrics] = {}
        # The request path's children, each through its mmap slot (fast_counter).
        self.hot_requests: Incrementer = fast_counter(self.requests)
        self.hot_active = fast_counter(self.requests_active)
        self.hot_cache_hits: Incrementer = fast_counter(self.cache_hits)
        self.hot_cache_misses: Incrementer = fast_counter(self.cache_misses)
        self.hot_cache_bypasses: Incrementer = fast_counter(self.cache_bypasses)
        self.hot_duration: Observer = fast_histogram(self.request_duration)
        self.hot_ttft: Observer = fast_histogram(self.stream_ttft)

    @property
    def multiprocess(self) -> bool:
        return self.directory is not None

    def status(self, cls: str) -> Incrementer:
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


__all__ = ["Incrementer", "Metrics", "Observer", "extra_families", "fast_counter", "fast_histogram",
           "mark_process_dead", "multiprocess_dir", "prometheus_text", "wipe"]
