"""Telemetry of one worker: counters per request, the /metrics figures, access log, statsd.

The app calls ``started()`` when a request arrives and ``finished(rec)`` exactly once when it
ends (``RequestRecord.finish`` guards that); the proxy reports each backend attempt through
``backend_result``; the worker reports connections (``connection_opened``/``_closed``),
requests its HTTP layer answered itself (``protocol_error``) and calls ``tick()`` from its
main loop. ``snapshot``/``prometheus`` render ``/metrics`` for the whole gateway.

What counts (docs/adr/0006-cross-worker-metrics.md):

* ``requests_total`` counts every HTTP request the gateway's application received, its own
  endpoints (``/health``, ``/metrics``, ``/cache/stats``) included, on arrival — so it equals
  the number of access-log lines, and a ``/metrics`` answer includes the request asking.
* ``cache_hits``/``cache_misses`` count requests by their ``X-Cache`` answer (a coalesced
  follower is a HIT); ``/cache/stats`` counts lookups in the shared store instead.
* backend ``requests`` are attempts (a retry on another backend is one more), ``errors`` the
  attempts that failed, the latency is time to the response headers of good answers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ntonix.config import Config
from ntonix.core.figures import (
    TOKEN_KINDS,
    Extras,
    count_samples,
    figures,
    flatten,
    memory_rss_bytes,
    status_class,
    value,
)
from ntonix.core.record import RequestRecord
from ntonix.core.usage import Usage
from ntonix.telemetry import procstat
from ntonix.telemetry.logs import ACCESS
from ntonix.telemetry.prometheus import Metrics, extra_families, fast_counter, multiprocess_dir, prometheus_text
from ntonix.telemetry.statsd import StatsdSink

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric


log = logging.getLogger("ntonix.metrics")

RSS_EVERY_S = 5.0
UNKNOWN_MODEL = "unknown"  # the model label of a request that named none
OTHER_MODELS = "other"  # the model label once MAX_MODEL_LABELS models were seen by a worker
MAX_MODEL_LABELS = 200


def _count_usage(children: tuple[Any, ...], usage: Usage) -> None:
    prompt, completion, cached = children
    if usage.prompt:
        prompt.inc(usage.prompt)
    if usage.completion:
        completion.inc(usage.completion)
    if usage.cached_prompt:
        cached.inc(usage.cached_prompt)


class Telemetry:
    def __init__(self, config: Config, *, metrics_dir: str | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.metrics = Metrics(metrics_dir if metrics_dir is not None else multiprocess_dir())
        self.statsd = StatsdSink(config.metrics)
        self._clock = clock
        self._monotonic = monotonic
        self._started_at = procstat.started_at()
        self._master = procstat.master_pid()
        self._rss_at = -RSS_EVERY_S
        m = self.metrics
        # Hot-path shortcuts (attribute lookups add up at thousands of requests per second).
        self._requests_inc = m.hot_requests.inc
        self._active = m.hot_active
        self._connections = m.connections_active
        for backend in config.backends:
            m.backend(backend.address)  # every configured backend shows in /metrics from the start
        self._token_children: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._saved_children: dict[str, tuple[Any, ...]] = {}
        self._models: set[str] = set()
        # (counter family, live stats, what was copied so far) of the cluster's parts.
        self._cluster: list[tuple[Any, Mapping[str, int], dict[str, int]]] = []
        self._cluster_available: Callable[[], bool] = lambda: True
        self._cluster_gauge: Any = None
        self.tick()

    def __repr__(self) -> str:
        mode = f"multiprocess dir={self.metrics.directory}" if self.metrics.multiprocess else "single-process"
        return f"<Telemetry {mode} statsd={'on' if self.statsd.enabled else 'off'}>"

    # ------------------------------------------------------------------ request path
    def started(self) -> None:
        self._requests_inc()
        self._active.inc()

    def finished(self, rec: RequestRecord) -> None:
        m = self.metrics
        self._active.dec()
        m.status(status_class(rec.status)).inc()
        m.hot_duration.observe(rec.latency_ms / 1000.0)
        cache = rec.cache
        if cache == "HIT":
            m.hot_cache_hits.inc()
        elif cache == "MISS":
            m.hot_cache_misses.inc()
        elif cache == "BYPASS":
            m.hot_cache_bypasses.inc()
        streamed_ttft = rec.ttft_ms if rec.streamed else None
        if streamed_ttft is not None:
            m.hot_ttft.observe(streamed_ttft / 1000.0)
        if rec.backend and rec.backend_ok is None:
            m.backend(rec.backend).requests.inc()  # sent, but no verdict (the client left first)
        if self.statsd.enabled:
            self.statsd.request(rec)
        if ACCESS.enabled:
            ACCESS.request(rec, streamed_ttft)

    def tokens(self, model: str, backend: str, usage: Usage) -> None:
        """A backend's answer reported ``usage`` (``ntonix_tokens_total``)."""
        key = (self._model_label(model), backend)
        children = self._token_children.get(key)
        if children is None:
            counter = self.metrics.tokens
            children = self._token_children[key] = tuple(fast_counter(counter.labels(*key, kind))
                                                         for kind in TOKEN_KINDS)
        _count_usage(children, usage)

    def tokens_saved(self, model: str, usage: Usage) -> None:
        """An answer served from the gateway's cache: tokens no backend had to process."""
        label = self._model_label(model)
        children = self._saved_children.get(label)
        if children is None:
            counter = self.metrics.cache_tokens_saved
            children = self._saved_children[label] = tuple(fast_counter(counter.labels(label, kind))
                                                           for kind in TOKEN_KINDS)
        _count_usage(children, usage)

    def _model_label(self, model: str) -> str:
        # The model comes from the client: with a backend that serves any model, a client could
        # otherwise make a new series per request. Past MAX_MODEL_LABELS, the rest count together.
        if not model:
            return UNKNOWN_MODEL
        if model in self._models or len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        return OTHER_MODELS

    def backend_result(self, address: str, ok: bool, latency_ms: float | None) -> None:
        """One backend attempt settled: a good answer (with time to headers) or a failure."""
        b = self.metrics.backend(address)
        b.requests.inc()
        if not ok:
            b.errors.inc()
        elif latency_ms is not None:
            b.latency.observe(latency_ms / 1000.0)

    # ------------------------------------------------------------------ worker events
    def connection_opened(self) -> None:
        self._connections.inc()

    def connection_closed(self) -> None:
        self._connections.dec()

    def protocol_error(self) -> None:
        """A connection the HTTP layer answered itself (malformed request, or a crash → 500)."""
        self.metrics.protocol_errors.inc()

    def watch_cluster(self, redis: str, stats: Mapping[str, int], available: Callable[[], bool]) -> None:
        """Report the cluster's counters (ntonix/cluster/flights.py ``stats``, plain ints kept
        by the request path) in /metrics; copied on every :meth:`tick` and /metrics answer.
        ``redis`` labels the availability gauge (the URL without its credentials)."""
        self._cluster.append((self.metrics.cluster_flights, stats, {}))
        self._cluster_available = available
        self._cluster_gauge = self.metrics.cluster_available.labels(redis)
        self._sync_cluster()

    def watch_affinity(self, stats: Mapping[str, int]) -> None:
        """The shared prefix view's counters (ntonix/cluster/affinity.py ``stats``), as above."""
        self._cluster.append((self.metrics.cluster_affinity, stats, {}))
        self._sync_cluster()

    def _sync_cluster(self) -> None:
        for family, stats, seen in self._cluster:
            for name, n in stats.items():
                added = n - seen.get(name, 0)
                if added or name not in seen:
                    family.labels(name).inc(added)
                    seen[name] = n
        if self._cluster_gauge is not None:
            self._cluster_gauge.set(1.0 if self._cluster_available() else 0.0)

    def tick(self) -> None:
        """From the worker's main loop: write the buffered access log lines, copy the cluster's
        counters, and refresh this worker's RSS every ``RSS_EVERY_S``."""
        ACCESS.flush_if_due()
        self._sync_cluster()
        now = self._monotonic()
        if now - self._rss_at >= RSS_EVERY_S:
            self._rss_at = now
            self.metrics.worker_rss.set(procstat.rss_bytes())

    def reload(self, config: Config) -> None:
        self.config = config
        self.statsd.configure(config.metrics)
        for backend in config.backends:
            self.metrics.backend(backend.address)

    # ------------------------------------------------------------------ /metrics
    def _collect(self, backends: Sequence[tuple[str, str]],
                 load: Mapping[str, tuple[int, int]]) -> tuple[list[Metric], dict[Any, float], Extras]:
        started = time.perf_counter()
        self._rss_at = self._monotonic()
        self.metrics.worker_rss.set(procstat.rss_bytes())
        self._sync_cluster()
        families = self.metrics.collect()
        samples = flatten(families)
        extras = Extras(
            uptime_s=max(0.0, self._clock() - self._started_at),
            master_rss_bytes=procstat.rss_bytes(self._master) if self._master else 0,
            backends=list(backends),
            worker_pid=os.getpid(),
            load=load)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("metrics.collected", extra={"files": self.metrics.file_count(), "families": len(families),
                                                  "ms": round((time.perf_counter() - started) * 1000.0, 3)})
        return families, samples, extras

    def cache_counts(self) -> tuple[int, int]:
        """(hits, misses) of the whole gateway, counted from each answer's X-Cache."""
        samples = flatten(self.metrics.collect())
        return int(value(samples, "ntonix_cache_hits_total")), int(value(samples, "ntonix_cache_misses_total"))

    def snapshot(self, backends: Sequence[tuple[str, str]],
                 load: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
        """``GET /metrics``: the JSON figures of the whole gateway; ``backends`` are this worker's
        (address, state) pairs, ``load`` the host's (in flight, queued) per backend address."""
        _, samples, extras = self._collect(backends, load or {})
        return figures(samples, extras)

    def prometheus(self, backends: Sequence[tuple[str, str]],
                   load: Mapping[str, tuple[int, int]] | None = None) -> bytes:
        """``GET /metrics?format=prometheus``: the same figures as Prometheus text."""
        families, samples, extras = self._collect(backends, load or {})
        computed = extra_families(extras, memory_rss_bytes(samples, extras.master_rss_bytes),
                                  count_samples(samples, "ntonix_worker_rss_bytes"))
        return prometheus_text([*families, *computed])
