"""The /metrics figures from merged metric samples: pure arithmetic, no I/O.

Theory of operation
-------------------
Every worker writes its counters, gauges and histograms with prometheus_client in
multiprocess mode (``ntonix.telemetry.prometheus``); whichever worker answers ``/metrics`` merges all
workers' files into one flat table of samples::

    {("ntonix_requests_total", ()): 1234.0,
     ("ntonix_backend_latency_seconds_bucket", (("backend", "127.0.0.1:8001"), ("le", "0.005"))): 17.0,
     ...}

This module turns that table into the JSON figures of INTERFACE.md (``figures``), computes
averages and quantiles from histogram buckets the way Prometheus' ``histogram_quantile``
does, and holds the small naming rules (status classes, statsd-safe names). The same table
feeds the Prometheus text, so both formats always show the same numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Labels = tuple[tuple[str, str], ...]
Samples = Mapping[tuple[str, Labels], float]

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
OTHER_STATUS = "other"  # 0 = no answer was started (client left, crash before headers)

# Seconds. Loopback answers take about a millisecond, a long LLM answer minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)

_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")


def status_class(status: int) -> str:
    """``"2xx"`` for 200..299 and so on; ``"other"`` for anything outside 100..599."""
    return f"{status // 100}xx" if 100 <= status <= 599 else OTHER_STATUS


def statsd_safe(name: str) -> str:
    """A backend address as one statsd path segment: ``127.0.0.1:8001`` → ``127_0_0_1_8001``."""
    return _UNSAFE.sub("_", name).strip("_") or "unknown"


def labels_key(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def flatten(families: Iterable[Any]) -> dict[tuple[str, Labels], float]:
    """prometheus_client metric families → the flat sample table (``_created`` dropped)."""
    out: dict[tuple[str, Labels], float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, labels_key(sample.labels))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, labels_key(labels)), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``{label value: sum}`` over every sample ``name`` (other labels summed away)."""
    out: dict[str, float] = {}
    for (sample_name, labels), v in samples.items():
        if sample_name != name:
            continue
        for k, lv in labels:
            if k == label:
                out[lv] = out.get(lv, 0.0) + v
    return out


def total(samples: Samples, name: str) -> float:
    """Sum of every sample called ``name``, whatever its labels (e.g. per-pid gauges)."""
    return sum(v for (sample_name, _), v in samples.items() if sample_name == name)


def count_samples(samples: Samples, name: str) -> int:
    return sum(1 for (sample_name, _) in samples if sample_name == name)


@dataclass(frozen=True, slots=True)
class Histogram:
    count: float
    sum: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, +Inf last

    @property
    def avg(self) -> float | None:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets)


def histogram(samples: Samples, name: str, **labels: str) -> Histogram:
    """The histogram ``name`` (base name, without ``_bucket``) for exactly these labels."""
    want = labels_key(labels)
    buckets = []
    for (sample_name, sample_labels), v in samples.items():
        if sample_name != f"{name}_bucket":
            continue
        le = next((lv for k, lv in sample_labels if k == "le"), None)
        if le is None or tuple(kv for kv in sample_labels if kv[0] != "le") != want:
            continue
        buckets.append((float(le), v))
    buckets.sort()
    return Histogram(count=samples.get((f"{name}_count", want), 0.0), sum=samples.get((f"{name}_sum", want), 0.0),
                     buckets=tuple(buckets))


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding rank
    ``q × count``. The first bucket starts at 0; a rank in the ``+Inf`` bucket gives the
    highest finite bound. ``None`` without observations."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, got {q}")
    if not buckets or buckets[-1][1] <= 0:
        return None
    count = buckets[-1][1]
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank and cumulative > lower_count:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (cumulative - lower_count)
        lower_bound, lower_count = bound, cumulative
    return lower_bound


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def timing_figures(h: Histogram) -> dict[str, Any]:
    """``{"count", "avg", "p50", "p99"}`` in milliseconds (``avg`` 0.0 and quantiles ``None``
    while nothing was observed)."""
    return {"count": int(h.count), "avg": _ms(h.avg) or 0.0, "p50": _ms(h.quantile(0.5)), "p99": _ms(h.quantile(0.99))}


@dataclass(frozen=True, slots=True)
class Extras:
    """What the answering worker adds to the merged samples."""

    uptime_s: float
    master_rss_bytes: int
    backends: Sequence[tuple[str, str]]  # (address, state) from the answering worker's registry
    worker_pid: int
    load: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # address -> (in flight, queued), host-wide


def memory_rss_bytes(samples: Samples, master_rss_bytes: int) -> int:
    """The gateway's resident memory: every live worker's last reading plus the master's."""
    return int(total(samples, "ntonix_worker_rss_bytes")) + master_rss_bytes


TOKEN_KINDS = ("prompt", "completion", "cached_prompt")


def token_figures(samples: Samples, name: str, by: str | None) -> dict[str, Any]:
    """Token counts: totals per kind, then ``by_model`` (and ``by_<by>``, e.g. ``by_backend``)."""
    out: dict[str, Any] = dict.fromkeys(TOKEN_KINDS, 0)
    groups: dict[str, dict[str, dict[str, int]]] = {"by_model": {}}
    if by is not None:
        groups[f"by_{by}"] = {}
    for (sample_name, labels), v in samples.items():
        if sample_name != name:
            continue
        got = dict(labels)
        kind = got.get("kind", "")
        if kind not in out:
            continue
        n = int(min(v, _JSON_INT_MAX))
        out[kind] = min(out[kind] + n, _JSON_INT_MAX)
        for group, label in (("by_model", "model"), (f"by_{by}", by)):
            if label is not None and group in groups:
                per = groups[group].setdefault(got.get(label, ""), dict.fromkeys(TOKEN_KINDS, 0))
                per[kind] = min(per[kind] + n, _JSON_INT_MAX)
    out.update(groups)
    return out


_JSON_INT_MAX = 2**63 - 1  # orjson writes no larger integer: a sum past it shows as this, never a 500


def figures(samples: Samples, extras: Extras) -> dict[str, Any]:
    """The ``GET /metrics`` JSON body (INTERFACE.md keys first, then ours)."""
    req_backend = by_label(samples, "ntonix_backend_requests_total", "backend")
    err_backend = by_label(samples, "ntonix_backend_errors_total", "backend")
    backends = []
    for address, state in extras.backends:
        lat = histogram(samples, "ntonix_backend_latency_seconds", backend=address)
        backends.append({
            "address": address,
            "state": state,
            "requests": int(req_backend.get(address, 0.0)),
            "errors": int(err_backend.get(address, 0.0)),
            "latency_avg_ms": _ms(lat.avg) or 0.0,
            "latency_p50_ms": _ms(lat.quantile(0.5)),
            "latency_p99_ms": _ms(lat.quantile(0.99)),
            "in_flight": extras.load.get(address, (0, 0))[0],
            "queued": extras.load.get(address, (0, 0))[1],
        })
    responses = {cls: 0 for cls in STATUS_CLASSES}
    for cls, n in by_label(samples, "ntonix_responses_total", "status_class").items():
        responses[cls] = int(n)
    return {
        "requests_total": int(value(samples, "ntonix_requests_total")),
        "requests_active": int(value(samples, "ntonix_requests_active")),
        "cache_hits": int(value(samples, "ntonix_cache_hits_total")),
        "cache_misses": int(value(samples, "ntonix_cache_misses_total")),
        "connections_active": int(value(samples, "ntonix_connections_active")),
        "uptime_s": round(extras.uptime_s, 3),
        "memory_rss_bytes": memory_rss_bytes(samples, extras.master_rss_bytes),
        "backends": backends,
        "cache_bypasses": int(value(samples, "ntonix_cache_bypasses_total")),
        "responses": responses,
        "protocol_errors": int(value(samples, "ntonix_protocol_errors_total")),
        "latency_ms": timing_figures(histogram(samples, "ntonix_request_duration_seconds")),
        "stream_ttft_ms": timing_figures(histogram(samples, "ntonix_stream_ttft_seconds")),
        "workers": count_samples(samples, "ntonix_worker_rss_bytes"),
        "tokens": token_figures(samples, "ntonix_tokens_total", "backend"),
        "cache_tokens_saved": token_figures(samples, "ntonix_cache_tokens_saved_total", None),
        "worker_pid": extras.worker_pid,
        "cluster": cluster_figures(samples),
    }


def cluster_figures(samples: Samples) -> dict[str, Any] | None:
    """Coalescing and prefix affinity across gateways, summed over workers (``None`` when
    neither runs: no ``cache.redis_url``)."""
    available = [v for (name, _), v in samples.items() if name == "ntonix_cluster_redis_available"]
    flights = by_label(samples, "ntonix_cluster_flights_total", "outcome")
    affinity = by_label(samples, "ntonix_cluster_affinity_total", "event")
    if not (available or affinity):
        return None
    return {"redis_available": min(available, default=1.0) >= 1.0,
            "flights": {k: int(n) for k, n in sorted(flights.items())},
            "affinity": {k: int(n) for k, n in sorted(affinity.items())}}
