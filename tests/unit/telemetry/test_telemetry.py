"""Telemetry: the pure figures (ntonix.core.figures) with plain values, and one worker's Telemetry
in single-process mode with a fake registry and a fake statsd client (no sockets, no files).

The cross-worker behaviour (multiprocess files, HUP, killed workers, real UDP) is tested live
in tests/integration/test_observability.py.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ntonix.config import BackendConfig, Config, LoggingConfig, MetricsConfig
from ntonix.core import figures
from ntonix.core.figures import Extras, Histogram, histogram_quantile, statsd_safe, status_class
from ntonix.core.record import RequestRecord
from ntonix.telemetry.logs import ACCESS
from ntonix.telemetry.recorder import Telemetry
from ntonix.telemetry.statsd import StatsdSink

# ----------------------------------------------------------------------------- naming rules


def test_status_class() -> None:
    assert [status_class(s) for s in (100, 200, 204, 304, 404, 499, 500, 599)] == [
        "1xx", "2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "5xx"]
    assert status_class(0) == "other"
    assert status_class(600) == "other"


def test_statsd_safe_names() -> None:
    assert statsd_safe("127.0.0.1:8001") == "127_0_0_1_8001"
    assert statsd_safe("llm-a.internal:443") == "llm-a_internal_443"
    assert statsd_safe("[::1]:8001") == "1_8001"
    assert statsd_safe("::") == "unknown"


# ----------------------------------------------------------------------------- quantiles

INF = math.inf


def test_quantile_interpolates_inside_the_bucket() -> None:
    # 10 observations <= 1, 10 more in (1, 2]: the median is the top of the first bucket.
    buckets = [(1.0, 10.0), (2.0, 20.0), (INF, 20.0)]
    assert histogram_quantile(0.5, buckets) == 1.0
    assert histogram_quantile(0.75, buckets) == 1.5
    assert histogram_quantile(0.25, buckets) == 0.5  # the first bucket starts at 0
    assert histogram_quantile(1.0, buckets) == 2.0


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.99, [(1.0, 1.0), (5.0, 2.0), (INF, 100.0)]) == 5.0


def test_quantile_skips_empty_buckets() -> None:
    assert histogram_quantile(0.5, [(0.1, 0.0), (0.2, 0.0), (0.4, 4.0), (INF, 4.0)]) == pytest.approx(0.3)


def test_quantile_without_observations_is_none() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(1.0, 0.0), (INF, 0.0)]) is None


def test_quantile_out_of_range_raises() -> None:
    with pytest.raises(ValueError):
        histogram_quantile(1.5, [(1.0, 1.0), (INF, 1.0)])


# ----------------------------------------------------------------------------- samples → figures

L = figures.labels_key


def _hist(name: str, labels: dict[str, str], counts: list[tuple[str, float]], total: float) -> dict[Any, float]:
    out: dict[Any, float] = {}
    for le, n in counts:
        out[(f"{name}_bucket", L({**labels, "le": le}))] = n
    out[(f"{name}_count", L(labels))] = counts[-1][1]
    out[(f"{name}_sum", L(labels))] = total
    return out


def test_histogram_selects_exactly_its_labels() -> None:
    samples = {
        **_hist("lat", {"backend": "a"}, [("0.1", 2.0), ("+Inf", 4.0)], 1.0),
        **_hist("lat", {"backend": "b"}, [("0.1", 1.0), ("+Inf", 1.0)], 0.05),
    }
    h = figures.histogram(samples, "lat", backend="a")
    assert h == Histogram(count=4.0, sum=1.0, buckets=((0.1, 2.0), (INF, 4.0)))
    assert h.avg == 0.25
    assert figures.histogram(samples, "lat", backend="c").avg is None


SAMPLES: dict[Any, float] = {
    ("ntonix_requests_total", ()): 301.0,
    ("ntonix_requests_active", ()): 1.0,
    ("ntonix_connections_active", ()): 3.0,
    ("ntonix_cache_hits_total", ()): 7.0,
    ("ntonix_cache_misses_total", ()): 5.0,
    ("ntonix_cache_bypasses_total", ()): 288.0,
    ("ntonix_protocol_errors_total", ()): 2.0,
    ("ntonix_responses_total", L({"status_class": "2xx"})): 297.0,
    ("ntonix_responses_total", L({"status_class": "5xx"})): 3.0,
    ("ntonix_worker_rss_bytes", L({"pid": "11"})): 1000.0,
    ("ntonix_worker_rss_bytes", L({"pid": "12"})): 2000.0,
    ("ntonix_backend_requests_total", L({"backend": "a:1"})): 200.0,
    ("ntonix_backend_errors_total", L({"backend": "a:1"})): 3.0,
    ("ntonix_backend_requests_total", L({"backend": "gone:9"})): 50.0,
    ("ntonix_tokens_total", L({"model": "m1", "backend": "a:1", "kind": "prompt"})): 100.0,
    ("ntonix_tokens_total", L({"model": "m1", "backend": "a:1", "kind": "cached_prompt"})): 60.0,
    ("ntonix_tokens_total", L({"model": "m2", "backend": "b:2", "kind": "prompt"})): 10.0,
    ("ntonix_tokens_total", L({"model": "m2", "backend": "b:2", "kind": "completion"})): 5.0,
    ("ntonix_cache_tokens_saved_total", L({"model": "m1", "kind": "completion"})): 7.0,
    **_hist("ntonix_backend_latency_seconds", {"backend": "a:1"},
            [("0.001", 0.0), ("0.005", 100.0), ("0.01", 197.0), ("+Inf", 197.0)], 0.985),
    **_hist("ntonix_request_duration_seconds", {}, [("0.01", 300.0), ("+Inf", 300.0)], 1.5),
    **_hist("ntonix_stream_ttft_seconds", {}, [("0.01", 0.0), ("+Inf", 0.0)], 0.0),
}


def test_figures_have_the_interface_keys_and_sums() -> None:
    out = figures.figures(SAMPLES, Extras(uptime_s=12.3456, master_rss_bytes=500,
                                          backends=[("a:1", "healthy"), ("b:2", "open")], worker_pid=12,
                                          load={"a:1": (3, 1)}))
    assert {k: out[k] for k in ("requests_total", "requests_active", "cache_hits", "cache_misses",
                                "connections_active", "uptime_s", "memory_rss_bytes")} == {
        "requests_total": 301, "requests_active": 1, "cache_hits": 7, "cache_misses": 5,
        "connections_active": 3, "uptime_s": 12.346, "memory_rss_bytes": 3500}
    a, b = out["backends"]
    assert a == {"address": "a:1", "state": "healthy", "requests": 200, "errors": 3, "latency_avg_ms": 5.0,
                 "latency_p50_ms": 4.94, "latency_p99_ms": 9.898, "in_flight": 3, "queued": 1}
    # A backend without traffic yet; one that left the configuration is not listed.
    assert b == {"address": "b:2", "state": "open", "requests": 0, "errors": 0, "latency_avg_ms": 0.0,
                 "latency_p50_ms": None, "latency_p99_ms": None, "in_flight": 0, "queued": 0}
    assert out["tokens"] == {
        "prompt": 110, "completion": 5, "cached_prompt": 60,
        "by_model": {"m1": {"prompt": 100, "completion": 0, "cached_prompt": 60},
                     "m2": {"prompt": 10, "completion": 5, "cached_prompt": 0}},
        "by_backend": {"a:1": {"prompt": 100, "completion": 0, "cached_prompt": 60},
                       "b:2": {"prompt": 10, "completion": 5, "cached_prompt": 0}}}
    assert out["cache_tokens_saved"] == {"prompt": 0, "completion": 7, "cached_prompt": 0,
                                         "by_model": {"m1": {"prompt": 0, "completion": 7, "cached_prompt": 0}}}
    assert out["responses"] == {"1xx": 0, "2xx": 297, "3xx": 0, "4xx": 0, "5xx": 3}
    assert out["latency_ms"] == {"count": 300, "avg": 5.0, "p50": 5.0, "p99": 9.9}
    assert out["stream_ttft_ms"] == {"count": 0, "avg": 0.0, "p50": None, "p99": None}
    assert (out["workers"], out["worker_pid"], out["protocol_errors"], out["cache_bypasses"]) == (2, 12, 2, 288)


def test_flatten_sums_duplicates_and_drops_created() -> None:
    @dataclass
    class S:
        name: str
        labels: dict[str, str]
        value: float

    @dataclass
    class F:
        samples: list[S] = field(default_factory=list)

    fams = [F([S("x_total", {"a": "1"}, 2.0), S("x_created", {"a": "1"}, 1e9)]), F([S("x_total", {"a": "1"}, 3.0)])]
    assert figures.flatten(fams) == {("x_total", (("a", "1"),)): 5.0}


# ----------------------------------------------------------------------------- one worker's Telemetry


class FakePipeline:
    def __init__(self, sent: list[str]) -> None:
        self.sent, self.stats = sent, []

    def incr(self, stat: str, count: int = 1) -> None:
        self.stats.append(f"{stat}:{count}|c")

    def timing(self, stat: str, ms: float) -> None:
        self.stats.append(f"{stat}:{ms:g}|ms")

    def send(self) -> None:
        self.sent.append("\n".join(self.stats))


class FakeStatsClient:
    def __init__(self, host: str, port: int, prefix: str | None = None, ipv6: bool = False) -> None:
        self.target = (host, port, prefix, ipv6)
        self.packets: list[str] = []
        self.closed = False

    def pipeline(self) -> FakePipeline:
        return FakePipeline(self.packets)

    def close(self) -> None:
        self.closed = True


def _config(**metrics: Any) -> Config:
    return Config(backends=(BackendConfig("a", 1), BackendConfig("b", 2)), metrics=MetricsConfig(**metrics))


def _rec(status: int = 200, cache: str = "BYPASS", backend: str = "a:1", ok: bool | None = True,
         streamed: bool = False, ttft_ms: float | None = None) -> RequestRecord:
    rec = RequestRecord("POST", "/v1/chat/completions", "rid-1", "10.0.0.9", status=status, cache=cache,
                        backend=backend, backend_ok=ok, backend_latency_ms=4.0 if ok else None, streamed=streamed,
                        ttft_ms=ttft_ms, bytes_sent=10)
    rec.latency_ms = 12.5
    return rec


@pytest.fixture
def telemetry() -> Telemetry:
    return Telemetry(_config(), metrics_dir="")  # "" = this process only


def test_telemetry_counts_requests_on_arrival_and_answers_on_finish(telemetry: Telemetry) -> None:
    backends = [("a:1", "healthy"), ("b:2", "unhealthy")]
    for _ in range(3):
        telemetry.started()
    telemetry.backend_result("a:1", ok=False, latency_ms=None)  # a failed attempt, retried on b
    telemetry.backend_result("b:2", ok=True, latency_ms=8.0)
    telemetry.finished(_rec(backend="b:2"))
    telemetry.finished(_rec(cache="HIT", backend="", ok=None))
    snap = telemetry.snapshot(backends)
    assert (snap["requests_total"], snap["requests_active"], snap["cache_hits"], snap["cache_bypasses"]) == (3, 1, 1, 1)
    assert snap["responses"]["2xx"] == 2
    assert [(b["address"], b["state"], b["requests"], b["errors"]) for b in snap["backends"]] == [
        ("a:1", "healthy", 1, 1), ("b:2", "unhealthy", 1, 0)]
    assert snap["backends"][1]["latency_avg_ms"] == 8.0
    assert snap["workers"] == 1 and snap["memory_rss_bytes"] > 0


def test_an_attempt_without_verdict_still_counts_as_a_backend_request(telemetry: Telemetry) -> None:
    backends = [("a:1", "healthy")]
    telemetry.started()
    telemetry.finished(_rec(status=200, ok=None, backend="a:1"))  # the client left mid-answer
    (backend,) = telemetry.snapshot(backends)["backends"]
    assert (backend["requests"], backend["errors"]) == (1, 0)


def test_stream_ttft_only_for_streams(telemetry: Telemetry) -> None:
    backends: list[tuple[str, str]] = []
    telemetry.finished(_rec(ttft_ms=3.0))  # a plain answer's first byte is not a TTFT
    telemetry.finished(_rec(streamed=True, ttft_ms=40.0))
    assert telemetry.snapshot(backends)["stream_ttft_ms"]["count"] == 1


def test_prometheus_text_parses_and_matches_the_json(telemetry: Telemetry) -> None:
    backends = [("a:1", "half_open")]
    telemetry.started()
    telemetry.backend_result("a:1", ok=True, latency_ms=2.0)
    telemetry.finished(_rec(backend="a:1"))
    text = telemetry.prometheus(backends).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(name.startswith("ntonix_") for name in fams)
    assert fams["ntonix_requests"].samples[0].value == 1.0
    states = {s.labels["state"]: s.value for s in fams["ntonix_backend_state"].samples}
    assert states["half_open"] == 1.0 and states["healthy"] == 0.0
    assert {"ntonix_uptime_seconds", "ntonix_memory_rss_bytes", "ntonix_backend_latency_seconds",
            "ntonix_stream_ttft_seconds", "ntonix_connections_active"} <= set(fams)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += record.getMessage().split("\n")


def test_access_line_fields(telemetry: Telemetry) -> None:
    out = _Lines()
    ACCESS.configure(LoggingConfig(), out)
    try:
        telemetry.finished(_rec(streamed=True, ttft_ms=7.25, cache="MISS"))
        ACCESS.flush()
    finally:
        ACCESS.configure(LoggingConfig(), None)
    (line,) = out.lines
    record = json.loads(line)
    assert record["message"] == "request.done" and record["component"] == "ntonix.access"
    got = {k: record[k] for k in ("method", "path", "status", "latency_ms", "ttft_ms", "cache", "backend",
                                  "bytes_sent", "client", "request_id")}
    assert got == {"method": "POST", "path": "/v1/chat/completions", "status": 200, "latency_ms": 12.5,
                   "ttft_ms": 7.25, "cache": "MISS", "backend": "a:1", "bytes_sent": 10, "client": "10.0.0.9",
                   "request_id": "rid-1"}


# ----------------------------------------------------------------------------- statsd


def _sink(**metrics: Any) -> tuple[StatsdSink, list[FakeStatsClient]]:
    made: list[FakeStatsClient] = []

    def factory(*args: Any, **kwargs: Any) -> FakeStatsClient:
        made.append(FakeStatsClient(*args, **kwargs))
        return made[-1]

    return StatsdSink(MetricsConfig(**metrics), client_factory=factory), made


def test_statsd_off_without_host() -> None:
    sink, made = _sink()
    assert not sink.enabled
    sink.request(_rec())
    assert made == []


def test_statsd_one_datagram_per_request() -> None:
    sink, made = _sink(statsd_host="127.0.0.1", statsd_port=9125, statsd_prefix="gw")
    assert made == []  # lazily, on first use (in the worker, after fork)
    sink.request(_rec(cache="MISS", backend="127.0.0.1:8001"))
    sink.request(_rec(cache="HIT", backend="", ok=None, status=200))
    sink.request(_rec(status=503, cache="BYPASS", backend="127.0.0.1:8001", ok=False))
    sink.request(_rec(streamed=True, ttft_ms=30.0))
    (client,) = made
    assert client.target == ("127.0.0.1", 9125, "gw", False)
    first, hit, failed, stream = (p.split("\n") for p in client.packets)
    assert first == ["requests:1|c", "status.2xx:1|c", "cache.miss:1|c", "latency:12.5|ms",
                     "backend.127_0_0_1_8001.latency:4|ms"]
    assert hit == ["requests:1|c", "status.2xx:1|c", "cache.hit:1|c", "latency:12.5|ms"]
    assert failed == ["requests:1|c", "status.5xx:1|c", "latency:12.5|ms"]
    assert "stream.ttft:30|ms" in stream


def test_statsd_reload_makes_a_new_client_only_when_the_target_changes() -> None:
    sink, made = _sink(statsd_host="127.0.0.1")
    sink.request(_rec())
    sink.configure(MetricsConfig(statsd_host="127.0.0.1"))
    sink.request(_rec())
    assert len(made) == 1
    sink.configure(MetricsConfig(statsd_host="127.0.0.1", statsd_port=9999))
    assert made[0].closed
    sink.request(_rec())
    assert len(made) == 2 and made[1].target[1] == 9999
    sink.configure(MetricsConfig())
    assert not sink.enabled


def test_statsd_unresolvable_host_is_reported_once_and_switched_off(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise OSError("Name or service not known")

    sink = StatsdSink(MetricsConfig(statsd_host="nowhere.invalid"), client_factory=failing)
    with caplog.at_level(logging.WARNING, logger="ntonix.metrics"):
        sink.request(_rec())
        sink.request(_rec())
    assert len(calls) == 1 and not sink.enabled
    assert [r.getMessage() for r in caplog.records] == ["statsd.disabled"]


def test_metric_values_take_no_greenlet_lock_under_gevent(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import gevent.thread

    from ntonix.telemetry import prometheus as metrics

    real = metrics._value_lock()
    assert real.acquire(blocking=False) and not real.acquire(blocking=False)  # without gevent: a real lock
    monkeypatch.setattr(threading, "Lock", gevent.thread.allocate_lock)  # what monkey-patching installs
    with metrics._value_lock():  # updates never yield: nothing to exclude between greenlets
        pass
    assert isinstance(metrics._value_lock(), metrics._NoLock)


def test_cluster_figures_appear_only_with_a_cluster_and_follow_its_counters(telemetry: Telemetry) -> None:
    assert telemetry.snapshot([])["cluster"] is None  # no cache.redis_url: nothing to show
    stats = {"led": 2, "followed": 0, "redis_errors": 0}
    up = [True]
    telemetry.watch_cluster("redis://h:6379/0", stats, lambda: up[0])
    assert telemetry.snapshot([])["cluster"] == {"redis_available": True, "affinity": {},
                                                "flights": {"followed": 0, "led": 2, "redis_errors": 0}}
    stats["followed"] += 3
    stats["redis_errors"] += 1
    up[0] = False
    telemetry.tick()
    telemetry.tick()  # copied once: deltas, not totals
    assert telemetry.snapshot([])["cluster"] == {"redis_available": False, "affinity": {},
                                                "flights": {"followed": 3, "led": 2, "redis_errors": 1}}
    board = {"published": 0, "merged": 0}
    telemetry.watch_affinity(board)
    board["merged"] = 5
    telemetry.tick()
    assert telemetry.snapshot([])["cluster"]["affinity"] == {"merged": 5, "published": 0}
    text = telemetry.prometheus([])
    assert b'ntonix_cluster_affinity_total{event="merged"} 5.0' in text
    assert b'ntonix_cluster_flights_total{outcome="followed"} 3.0' in text
    assert b'ntonix_cluster_redis_available{redis="redis://h:6379/0"} 0.0' in text


def test_token_sums_past_what_json_can_write_show_the_largest_it_can() -> None:
    # Two workers' counters of 2^63 tokens each: /metrics answered 500 for good (orjson refuses
    # an integer past 64 bits). The counts are bounded where they are read (ntonix.core.usage);
    # this is the last guard.
    labels = (("backend", "b:1"), ("kind", "prompt"), ("model", "m"))
    samples = {("ntonix_tokens_total", (*labels, ("worker", "1"))): 2.0**63,
               ("ntonix_tokens_total", (*labels, ("worker", "2"))): 2.0**63}
    out = figures.token_figures(samples, "ntonix_tokens_total", "backend")
    assert out["prompt"] == out["by_model"]["m"]["prompt"] == out["by_backend"]["b:1"]["prompt"] == 2**63 - 1
    json.dumps(out)
    orjson.dumps(out)
