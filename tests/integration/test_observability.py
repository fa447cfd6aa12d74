"""Live tests of observability: access log, log levels and files, /metrics across workers, statsd.

Counting rule under test (docs/adr/0006): ``requests_total`` counts every request the gateway
receives, its own endpoints included, on arrival. So a ``/metrics`` answer includes the request
asking for it, and with no other traffic each ask reads exactly one more than the one before.
Figures counted when a request *ends* (status classes, latencies, cache) are polled for.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.live.procs import wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackendFactory

pytestmark = pytest.mark.integration

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "observability"}]}
ACCESS_FIELDS = {"timestamp", "level", "component", "message", "method", "path", "status", "latency_ms", "ttft_ms",
                 "cache", "backend", "bytes_sent", "client", "request_id"}
_ids = itertools.count(1)


# ----------------------------------------------------------------------------- helpers


def json_lines(gw: Gateway) -> list[dict[str, Any]]:
    """Every line of the gateway's output, parsed; fails on a line that is not a JSON object."""
    out = []
    for line in gw.output().splitlines():
        if line.strip():
            data = json.loads(line)
            assert isinstance(data, dict), line
            out.append(data)
    return out


def access_lines(gw: Gateway) -> list[dict[str, Any]]:
    return [d for d in json_lines(gw) if d.get("component") == "ntonix.access"]


def access_line(gw: Gateway, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((d for d in access_lines(gw) if d.get("request_id") == request_id), None)

    return wait_until(find, timeout=10, what=f"access line of {request_id}")


def worker_pids(gw: Gateway) -> list[int]:
    path = Path(f"/proc/{gw.pid}/task/{gw.pid}/children")
    return sorted(int(p) for p in path.read_text().split())


def prometheus_families(gw: Gateway, headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, hdrs, body = gw.request("GET", "/metrics?format=prometheus", headers=headers)
    assert status == 200, body[:300]
    assert hdrs["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(fams: dict[str, Any], name: str, **labels: str) -> float:
    for fam in fams.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(f"{name}{labels} not in the Prometheus text")


class Asker:
    """Asks ``/metrics`` on fresh connections and checks each answer counts exactly one more.

    ``expected`` is the next answer's ``requests_total``; ``pids`` the workers that answered
    (read back from the access log by request id), per format.
    """

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.expected: int | None = None
        self.pids: dict[str, set[int]] = {"json": set(), "prometheus": set()}

    def add(self, n: int) -> None:
        """``n`` other requests were made since the last ask."""
        assert self.expected is not None
        self.expected += n

    def ask(self, fmt: str = "json") -> dict[str, Any]:
        rid = f"metrics-ask-{next(_ids)}"
        if fmt == "json":
            status, _, body = self.gw.request("GET", "/metrics", headers={"X-Request-ID": rid})
            assert status == 200, body[:300]
            snap = json.loads(body)
            total = snap["requests_total"]
        else:
            fams = prometheus_families(self.gw, headers={"X-Request-ID": rid})
            total = int(sample(fams, "ntonix_requests_total"))
            snap = {"requests_total": total, "families": fams}
        if self.expected is not None:
            assert total == self.expected, f"{fmt}: requests_total {total}, expected exactly {self.expected}"
        self.expected = total + 1
        self.pids[fmt].add(int(access_line(self.gw, rid)["pid"]))
        return snap

    def until(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            snap = self.ask()
            if predicate(snap):
                return snap
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; last /metrics: {snap}")
            time.sleep(0.1)


def fire(gw: Gateway, requests: list[tuple[str, str, Any]], threads: int = 8) -> list[int]:
    """Send ``(method, path, body)`` requests concurrently, each on its own connection."""
    def one(req: tuple[str, str, Any]) -> int:
        method, path, body = req
        return gw.request(method, path, body)[0]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, requests))


@pytest.fixture
def backend(mock_backend: MockBackendFactory) -> Any:
    return mock_backend("a")


@pytest.fixture
def three_workers(gateway: GatewayFactory, backend: Any) -> Iterator[Gateway]:
    gw = gateway([backend], workers=3)
    wait_until(lambda: len(worker_pids(gw)) == 3 and gw.metrics()["workers"] == 3, timeout=20,
               what="3 workers serving")
    yield gw


# ----------------------------------------------------------------------------- access log


def test_every_output_line_is_json_and_each_request_has_an_access_line(gateway: GatewayFactory,
                                                                       backend: Any) -> None:
    gw = gateway([backend], workers=2)
    plain = gw.request("GET", "/echo/plain")
    miss = gw.request("POST", "/v1/chat/completions", CHAT)
    hit = gw.request("POST", "/v1/chat/completions", CHAT)
    stream = gw.request("POST", "/v1/chat/completions", {**CHAT, "stream": True})
    bad = gw.request("POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"})
    assert [r[0] for r in (plain, miss, hit, stream, bad)] == [200, 200, 200, 200, 400]
    lines = {name: access_line(gw, resp[1]["x-request-id"])
             for name, resp in (("plain", plain), ("miss", miss), ("hit", hit), ("stream", stream), ("bad", bad))}
    for line in lines.values():
        assert set(line) >= ACCESS_FIELDS, ACCESS_FIELDS - set(line)
        assert line["level"] == "info" and line["message"] == "request.done"
        assert line["client"] == "127.0.0.1" and line["latency_ms"] > 0
        assert line["timestamp"].endswith("Z")
    assert (lines["plain"]["method"], lines["plain"]["path"], lines["plain"]["status"]) == ("GET", "/echo/plain", 200)
    assert lines["plain"]["bytes_sent"] == len(plain[2])
    assert [lines[n]["cache"] for n in ("plain", "miss", "hit", "stream")] == ["BYPASS", "MISS", "HIT", "MISS"]
    assert lines["miss"]["backend"] == backend.address and lines["hit"]["backend"] is None
    assert lines["stream"]["ttft_ms"] > 0 and lines["plain"]["ttft_ms"] is None
    assert lines["stream"]["bytes_sent"] == len(stream[2])
    assert lines["bad"]["status"] == 400 and "JSON" in lines["bad"]["error"]
    # The master's own (gunicorn) lines are JSON as well: json_lines() parsed every line.
    components = {d["component"] for d in json_lines(gw)}
    assert {"gunicorn.error", "ntonix.access"} <= components


def test_text_format(gateway: GatewayFactory, backend: Any) -> None:
    gw = gateway([backend], config={"logging": {"format": "text"}})
    status, headers, _ = gw.request("GET", "/echo/text")
    rid = headers["x-request-id"]

    def line() -> str | None:
        return next((ln for ln in gw.output().splitlines() if f"request_id={rid}" in ln), None)

    text = wait_until(line, timeout=10, what="text access line")
    assert " INFO ntonix.access request.done method=GET path=/echo/text status=200 " in text
    assert f"backend={backend.address}" in text and "cache=BYPASS" in text
    assert not text.lstrip().startswith("{")


def test_log_level_debug_from_the_command_line(gateway: GatewayFactory, backend: Any) -> None:
    gw = gateway([backend], extra_args=("--log-level", "debug"))
    gw.metrics()
    debug = wait_until(lambda: [d for d in json_lines(gw) if d["level"] == "debug"], timeout=10, what="debug lines")
    assert any(d["message"] == "metrics.collected" and d["files"] > 0 for d in debug)


def test_log_level_warning_from_the_environment(gateway: GatewayFactory, backend: Any) -> None:
    gw = gateway([backend], env={"NTONIX_LOG_LEVEL": "warning"})
    for _ in range(5):
        assert gw.request("GET", "/echo/w")[0] == 200
    gw.metrics()
    backend.stop(quick=True)  # a warning-level event: the backend fails its health checks, then the breaker
    gw.request("GET", "/echo/w")

    def warnings() -> list[dict[str, Any]]:
        return [d for d in json_lines(gw) if d["level"] == "warning"]

    wait_until(warnings, timeout=15, what="a warning line")
    levels = {d["level"] for d in json_lines(gw)}
    assert levels <= {"warning", "error", "critical"}, levels  # no info, no debug, no access lines


def test_log_file_with_rotation(gateway: GatewayFactory, backend: Any, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "ntonix.log"
    log_file.parent.mkdir()
    max_bytes = 8192
    gw = gateway([backend], workers=3, config={"logging": {"file": str(log_file), "max_bytes": max_bytes,
                                                         "backup_count": 2}})
    # A process looks at the file size at most every 0.25 s (logs.SharedRotatingFileHandler):
    # bursts of 30 requests with pauses between them make every worker look several times.
    for _ in range(8):
        assert fire(gw, [("GET", "/echo/m", None)] * 30) == [200] * 30
        time.sleep(0.3)
    wait_until(lambda: (log_file.parent / "ntonix.log.2").exists(), timeout=10, what="two rotations")
    names = sorted(p.name for p in log_file.parent.iterdir())
    assert names == ["ntonix.log", "ntonix.log.1", "ntonix.log.2", "ntonix.log.lock"]
    for path in log_file.parent.glob("ntonix.log*"):
        if path.name.endswith(".lock"):
            continue
        lines = path.read_text().splitlines()
        assert all(json.loads(line)["timestamp"] for line in lines)  # whole lines, never interleaved
        assert path.stat().st_size <= max_bytes + 30 * 1024  # at most one burst past the limit
    # Nothing went to the console but what came before logging was set up (none here).
    assert not [ln for ln in gw.output().splitlines() if "request.done" in ln]


# ----------------------------------------------------------------------------- /metrics across workers


def test_300_requests_count_exactly_300_whichever_worker_answers(three_workers: Gateway, backend: Any) -> None:
    gw = three_workers
    asker = Asker(gw)
    asker.ask("json")
    asker.ask("prometheus")
    mix = [("GET", "/echo/m", None)] * 240 + [("GET", "/health", None)] * 30 + \
          [("POST", "/v1/embeddings", {"model": "e", "input": f"text {i}"}) for i in range(30)]
    assert fire(gw, mix) == [200] * 300
    asker.add(300)
    # Ask many times, on fresh connections, in both formats, until each format was answered by
    # at least two different workers; every single answer must be exact.
    for i in range(60):
        asker.ask("json" if i % 2 == 0 else "prometheus")
        if i >= 10 and all(len(p) >= 2 for p in asker.pids.values()):
            break
    assert all(len(p) >= 2 for p in asker.pids.values()), asker.pids
    assert set().union(*asker.pids.values()) <= set(worker_pids(gw))
    # Counted at the end of each request: settles once the last answers are written.
    snap = asker.until(lambda s: s["responses"]["2xx"] == s["requests_total"] - 1, "all answers counted")
    backend_figures = snap["backends"][0]
    assert backend_figures["address"] == backend.address and backend_figures["state"] == "healthy"
    assert backend_figures["requests"] == 270 and backend_figures["errors"] == 0
    assert 0 < backend_figures["latency_avg_ms"] < 1000
    assert (snap["cache_bypasses"], snap["cache_misses"], snap["workers"]) == (240, 30, 3)


def test_prometheus_text_parses_and_shows_the_json_figures(three_workers: Gateway, backend: Any) -> None:
    gw = three_workers
    gw.request("POST", "/v1/chat/completions", CHAT)
    gw.request("POST", "/v1/chat/completions", CHAT)
    gw.request("POST", "/v1/chat/completions", {**CHAT, "stream": True})
    asker = Asker(gw)
    snap = asker.until(lambda s: s["stream_ttft_ms"]["count"] == 1 and s["cache_hits"] == 1, "the stream counted")
    fams = prometheus_families(gw)
    assert all(name.startswith("ntonix_") for name in fams), sorted(fams)
    assert sample(fams, "ntonix_requests_total") == snap["requests_total"] + 1
    assert sample(fams, "ntonix_cache_hits_total") == snap["cache_hits"] == 1
    assert sample(fams, "ntonix_cache_misses_total") == snap["cache_misses"] == 2
    assert sample(fams, "ntonix_backend_requests_total", backend=backend.address) == 2
    assert sample(fams, "ntonix_backend_state", backend=backend.address, state="healthy") == 1
    assert sample(fams, "ntonix_stream_ttft_seconds_count") == 1
    assert sample(fams, "ntonix_workers") == 3
    assert sample(fams, "ntonix_memory_rss_bytes") >= snap["memory_rss_bytes"] * 0.5
    assert sample(fams, "ntonix_uptime_seconds") >= snap["uptime_s"]
    assert len([s for s in fams["ntonix_worker_rss_bytes"].samples]) == 3
    for name in ("ntonix_request_duration_seconds", "ntonix_backend_latency_seconds", "ntonix_stream_ttft_seconds"):
        assert fams[name].type == "histogram"
    # The whole gateway's memory: three workers and the master, each tens of MB.
    assert snap["memory_rss_bytes"] > 4 * 10 * 1024 * 1024


def test_figures_survive_reload_shrink_and_a_killed_worker(three_workers: Gateway, backend: Any) -> None:
    gw = three_workers
    asker = Asker(gw)
    assert fire(gw, [("GET", "/echo/m", None)] * 60) == [200] * 60
    first = asker.ask()
    assert first["requests_total"] >= 61

    # 1. An in-place HUP: same workers, nothing reset, nothing doubled.
    pids = worker_pids(gw)
    gw.reload()
    wait_until(lambda: sum(d["message"] == "config.reloaded" for d in json_lines(gw)) >= 3, timeout=15,
               what="3 workers reloaded")
    assert worker_pids(gw) == pids
    for _ in range(6):
        asker.ask()
    assert fire(gw, [("GET", "/echo/m", None)] * 30) == [200] * 30
    asker.add(30)
    asker.ask()

    # 2. HUP with fewer workers: one worker retires; its counts stay, its live gauges go.
    gw.write_config({"server": {"threads": 2}})
    gw.reload()
    asker.until(lambda s: s["workers"] == 2 and len(worker_pids(gw)) == 2, "2 workers")
    retired = set(pids) - set(worker_pids(gw))
    assert len(retired) == 1

    # 3. SIGKILL a worker: gunicorn starts another; nothing drops.
    before = asker.ask()
    victim = worker_pids(gw)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in worker_pids(gw) and len(worker_pids(gw)) == 2, timeout=20,
               what="a new worker in place of the killed one")
    after = asker.until(lambda s: s["workers"] == 2 and s["connections_active"] == 1, "the killed worker gone")
    assert after["uptime_s"] >= before["uptime_s"]  # the gateway's uptime, not the new worker's
    assert after["requests_active"] == 1  # this request; the dead worker's gauges were dropped
    assert after["backends"][0]["requests"] == 90
    assert fire(gw, [("GET", "/echo/m", None)] * 20) == [200] * 20
    asker.add(20)
    final = asker.until(lambda s: s["backends"][0]["requests"] == 110, "the last 20 counted")
    assert final["responses"]["2xx"] >= 110


def test_active_connections_and_requests(gateway: GatewayFactory, mock_backend: MockBackendFactory) -> None:
    slow = mock_backend("slow", token_delay=0.3)
    gw = gateway([slow], workers=2, config={"server": {"keepalive_s": 30}})
    idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(3)]
    try:
        stream = socket.create_connection(("127.0.0.1", gw.port))
        body = json.dumps({**CHAT, "stream": True}).encode()
        stream.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        stream.settimeout(10)
        assert stream.recv(100).startswith(b"HTTP/1.1 200")
        asker = Asker(gw)
        snap = asker.until(lambda s: s["connections_active"] == 5, "3 idle + 1 stream + 1 asking")
        assert snap["requests_active"] == 2  # the stream and this /metrics request
        stream.close()
    finally:
        for s in idle:
            s.close()
    asker.until(lambda s: s["connections_active"] == 1 and s["requests_active"] == 1, "all closed")


def test_malformed_requests_are_counted_as_protocol_errors(gateway: GatewayFactory, backend: Any) -> None:
    gw = gateway([backend])
    asker = Asker(gw)
    before = asker.ask()["protocol_errors"]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"NOT A REQUEST\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b'"error"' in answer
    assert asker.until(lambda s: s["protocol_errors"] == before + 1, "the protocol error counted")


# ----------------------------------------------------------------------------- statsd


@pytest.fixture
def udp_listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def test_statsd_packets_for_a_request_a_cache_hit_and_a_stream(gateway: GatewayFactory, backend: Any,
                                                              udp_listener: socket.socket) -> None:
    port = udp_listener.getsockname()[1]
    gw = gateway([backend], workers=2, config={"metrics": {"statsd_host": "127.0.0.1", "statsd_port": port,
                                                           "statsd_prefix": "gw"}})
    assert gw.request("GET", "/echo/w")[0] == 200
    assert gw.request("POST", "/v1/chat/completions", CHAT)[1]["x-cache"] == "MISS"
    assert gw.request("POST", "/v1/chat/completions", CHAT)[1]["x-cache"] == "HIT"
    assert gw.request("POST", "/v1/chat/completions", {**CHAT, "stream": True})[0] == 200
    backend_timer = f"gw.backend.{backend.address.replace('.', '_').replace(':', '_')}.latency"
    wanted = {"gw.requests": "c", "gw.status.2xx": "c", "gw.cache.miss": "c", "gw.cache.hit": "c",
              "gw.latency": "ms", backend_timer: "ms", "gw.stream.ttft": "ms",
              "gw.gunicorn.requests": "c", "gw.gunicorn.request.duration": "ms"}
    seen: dict[str, list[tuple[float, str]]] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not set(wanted) <= set(seen):
        try:
            packet = udp_listener.recv(65536).decode()
        except TimeoutError:
            continue
        for line in packet.split("\n"):
            name, _, rest = line.partition(":")
            val, _, kind = rest.partition("|")
            seen.setdefault(name, []).append((float(val), kind.split("|")[0]))
    assert set(wanted) <= set(seen), set(wanted) - set(seen)
    for name, kind in wanted.items():
        assert all(k == kind for _, k in seen[name]), (name, seen[name])
    assert len(seen["gw.cache.hit"]) == 1 and len(seen["gw.stream.ttft"]) == 1
    assert all(v > 0 for v, _ in seen["gw.stream.ttft"] + seen[backend_timer])
