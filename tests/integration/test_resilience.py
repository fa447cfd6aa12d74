"""Backend health, circuit breaker, failover, hot reload and graceful shutdown.

Every test runs real processes: mock backends and a gateway (2 workers), and clients on
real sockets. Loads are bounded in time and count.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.live.procs import wait_until

pytestmark = pytest.mark.integration

FAST_HEALTH = {"interval_s": 0.3, "timeout_s": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 2}


class ClientLoop:
    """Threads sending sequential requests on keep-alive connections until stopped."""

    def __init__(self, port: int, threads: int = 4, path: str = "/echo/loop", method: str = "GET",
                 body: Callable[[int], bytes | None] = lambda i: None) -> None:
        self.port, self.path, self.method, self.body = port, path, method, body
        self.log: list[tuple[float, str | None, int]] = []  # (time, instance, status)
        self.errors: list[Any] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        self._deadline = time.monotonic() + 60  # hard bound whatever the test does

    def _run(self, n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        i = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            i += 1
            try:
                conn.request(self.method, f"{self.path}?t={n}-{i}", body=self.body(i),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                self.log.append((time.time(), resp.getheader("X-Mock-Instance"), resp.status))
                if resp.status != 200:
                    self.errors.append((resp.status, time.time()))
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append((repr(exc), time.time()))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def __enter__(self) -> ClientLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def count_since(self, since: float) -> Counter[str | None]:
        return Counter(name for t, name, _ in list(self.log) if t >= since)


def test_killed_backend_fails_over_without_errors_and_comes_back(mock_backend: Any, gateway: Any) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    gw = gateway([a, b], workers=2, config={"health": FAST_HEALTH})
    with ClientLoop(gw.port, method="POST", path="/v1/chat/completions",
                    body=lambda i: json.dumps({"model": "m", "messages": [
                        {"role": "user", "content": f"{time.time()} {i}"}]}).encode()) as loop:
        wait_until(lambda: loop.count_since(0)["a"] > 20 and loop.count_since(0)["b"] > 20, timeout=10)
        killed_at = time.time()
        a.proc.popen.kill()  # SIGKILL: no goodbye
        # Traffic moves to b only: wait for a stretch of 1 s with nothing on a.
        wait_until(lambda: time.time() - max(t for t, n, _ in loop.log if n == "a") > 1.0, timeout=10)
        last_on_a = max(t for t, n, _ in loop.log if n == "a")
        before_restart = time.time()
        a.start()
        interval, threshold = FAST_HEALTH["interval_s"], FAST_HEALTH["healthy_threshold"]
        wait_until(lambda: loop.count_since(before_restart)["a"] > 0, timeout=interval * threshold + 1.0 + 3.0)
        back_after = min(t for t, n, _ in loop.log if n == "a" and t >= before_restart) - before_restart
    assert loop.errors == [], f"client saw errors during failover: {loop.errors[:5]}"
    # The restarted process needs a moment to boot; what the gateway adds is bounded by the probes.
    assert back_after <= interval * threshold + 1.0 + 2.0, f"back after {back_after:.2f}s"
    print(f"death -> last routed: {last_on_a - killed_at:.3f}s; restart -> first routed: {back_after:.2f}s")


def test_backend_answering_500s_is_ejected_and_readmitted(mock_backend: Any, gateway: Any) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    gw = gateway([a, b], workers=1, config={
        "health": {"interval_s": 5},  # probes stay good: only the breaker acts here
        "circuit_breaker": {"failure_threshold": 3, "cooldown_s": 1.0}})
    a.control(fail=True)
    statuses = Counter()
    def chat(i: int | str) -> tuple[int, dict[str, str], bytes]:
        return gw.request("POST", "/v1/chat/completions", {"model": "m", "messages": [
            {"role": "user", "content": f"q{i}"}]}, headers={"Cache-Control": "no-store"})

    for i in range(30):
        status, headers, _ = chat(i)
        statuses[(headers.get("x-mock-instance"), status)] += 1
    # a's 500s pass through until its breaker opens after 3 failures; then only b answers.
    assert statuses[("a", 500)] == 3, statuses
    assert statuses[("b", 200)] == 27, statuses
    a.control(fail=False)
    opened = time.monotonic()
    wait_until(lambda: chat("back")[1].get("x-mock-instance") == "a", timeout=5)
    assert time.monotonic() - opened >= 0.5  # not before (most of) the cooldown
    assert "backend.breaker_changed" in gw.output()


def test_all_backends_down_gives_503_with_retry_after(mock_backend: Any, gateway: Any) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    gw = gateway([a, b], workers=2, config={"health": FAST_HEALTH})
    assert gw.health()[0] == 200
    a.stop(quick=True)  # outages: nothing to drain
    b.stop(quick=True)
    # Each worker probes on its own: wait until every answer (new connections, any worker) agrees.
    wait_until(lambda: all(gw.health()[0] == 503 for _ in range(8)), timeout=5)
    status, body = gw.health()
    assert body == {"status": "unavailable", "backends": {"healthy": 0, "total": 2}}
    status, headers, raw = gw.request("POST", "/v1/chat/completions", {"model": "m", "messages": []})
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    assert json.loads(raw)["error"]["code"] == "no_healthy_backend"


def _stream_request(port: int, tokens: int = 12, delay: float = 0.15) -> tuple[socket.socket, bytes]:
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": str(time.time())}]})
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Cache-Control: no-store\r\nX-Mock-Tokens: {tokens}\r\nX-Mock-Token-Delay: {delay}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    return s, first


def _read_to_end(s: socket.socket, data: bytes) -> bytes:
    while not data.endswith(b"\r\n0\r\n\r\n"):
        more = s.recv(65536)
        if not more:
            break
        data += more
    s.close()
    return data


def test_hup_swaps_a_backend_with_zero_errors_and_whole_streams(mock_backend: Any, gateway: Any) -> None:
    a, b, c = mock_backend("a"), mock_backend("b"), mock_backend("c")
    gw = gateway([a, b], workers=2, config={"health": FAST_HEALTH})
    with ClientLoop(gw.port) as loop:
        wait_until(lambda: loop.count_since(0)["b"] > 20, timeout=10)
        stream, head = _stream_request(gw.port)  # a stream that started before the HUP
        served_by = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-mock-instance")]
        gw.set_backends([a, c])
        gw.reload()
        wait_until(lambda: "config.reloaded" in gw.output() and gw.output().count("config.reloaded") >= 2,
                   timeout=5)
        reloaded = time.time()
        wait_until(lambda: loop.count_since(reloaded)["c"] > 20, timeout=10)
        data = _read_to_end(stream, head)
        b_echo = b.stats()["by_path"]  # /echo is not in "requests" (API routes only): use by_path
        time.sleep(0.3)
        assert b.stats()["by_path"] == b_echo, "the removed backend still gets requests"
    assert loop.errors == [], loop.errors[:5]
    assert loop.count_since(reloaded + 0.2)["b"] == 0
    assert data.count(b"data: ") == 13 and b"data: [DONE]" in data and data.endswith(b"\r\n0\r\n\r\n"), data[-300:]
    assert served_by, head[:300]


def test_invalid_config_on_hup_keeps_serving(mock_backend: Any, gateway: Any) -> None:
    a = mock_backend("a")
    gw = gateway([a], workers=1)
    gw.write_config({"backends": [{"host": "127.0.0.1", "port": 0}]})
    gw.reload()
    wait_until(lambda: "config.reload_rejected" in gw.output(), timeout=5)
    assert "backends[0].port" in gw.output()
    assert gw.request("GET", "/echo/still")[0] == 200
    # A file that breaks the JSON parser itself (nesting deeper than Python's recursion limit).
    gw.config_path.write_text('{"a":' * 100_000)
    gw.reload()
    wait_until(lambda: "nested too deeply" in gw.output(), timeout=5, what="the second HUP rejected")
    assert gw.request("GET", "/echo/still")[0] == 200
    assert gw.proc.alive()


def test_sigterm_lets_a_stream_finish_and_exits_0_quickly(mock_backend: Any, gateway: Any) -> None:
    a = mock_backend("a")
    gw = gateway([a], workers=2, config={"server": {"graceful_timeout_s": 20}})
    idle = socket.create_connection(("127.0.0.1", gw.port))
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    stream, head = _stream_request(gw.port, tokens=12, delay=0.15)
    term_at = time.monotonic()
    gw.signal(signal.SIGTERM)
    data = _read_to_end(stream, head)
    stream_done = time.monotonic() - term_at
    code = gw.proc.wait(timeout=20)
    exited = time.monotonic() - term_at
    assert code == 0
    assert b"data: [DONE]" in data and data.endswith(b"\r\n0\r\n\r\n")
    # Idle keep-alive connections do not hold the shutdown for the whole graceful timeout.
    assert exited < stream_done + 3.0, (stream_done, exited)
    idle.settimeout(5)
    try:
        leftover = idle.recv(65536)
    except OSError:
        leftover = b""
    finally:
        idle.close()
    assert b"HTTP/1.1" not in leftover


def test_a_full_pool_is_busy_not_a_failed_backend(mock_backend: Any, gateway: Any) -> None:
    # pool.max_size connections busy for connect_timeout_s: the surplus requests get 503
    # backends_busy (with Retry-After), and the backend stays healthy and in rotation; it used
    # to count as a backend failure, open the breaker and turn every request into a 503.
    a = mock_backend("a")
    gw = gateway([a], workers=1, config={"pool": {"size": 2, "max_size": 2}, "proxy": {"connect_timeout_s": 0.5},
                                         "circuit_breaker": {"failure_threshold": 2, "cooldown_s": 60}})
    streams = [_stream_request(gw.port, tokens=16, delay=0.25) for _ in range(2)]  # both connections busy, 4 s
    busy = []
    for _ in range(3):
        status, headers, raw = gw.request("POST", "/v1/chat/completions", {"model": "m", "messages": []},
                                          headers={"Cache-Control": "no-store"})
        busy.append((status, headers.get("retry-after"), json.loads(raw)["error"]["code"]))
    assert busy == [(503, "1", "backends_busy")] * 3
    for s, head in streams:
        data = _read_to_end(s, head)
        assert b"data: [DONE]" in data and data.endswith(b"\r\n0\r\n\r\n"), data[-200:]
    assert gw.health() == (200, {"status": "ok", "backends": {"healthy": 1, "total": 1}})
    (backend,) = gw.metrics()["backends"]
    assert (backend["state"], backend["errors"]) == ("healthy", 0)
    status, _, _ = gw.request("POST", "/v1/chat/completions", {"model": "m", "messages": []},
                              headers={"Cache-Control": "no-store"})
    assert status == 200


def test_sigterm_past_the_graceful_timeout_logs_every_request_and_exits_0(mock_backend: Any, gateway: Any) -> None:
    # The audit: at graceful_timeout_s the master's SIGKILL beat the worker's own cut, so the
    # access lines of every request that finished during the drain were lost, with the
    # worker's warning and its clean exit. Now the worker cuts at graceful_timeout_s, logs, and
    # exits before the master's kill (KILL_MARGIN_S later).
    a = mock_backend("a")
    gw = gateway([a], workers=1, config={"server": {"graceful_timeout_s": 2}})
    short, short_head = _stream_request(gw.port, tokens=6, delay=0.15)  # ends ~1 s into the drain
    long, long_head = _stream_request(gw.port, tokens=40, delay=0.25)  # 10 s: cut at 2 s
    term_at = time.monotonic()
    gw.signal(signal.SIGTERM)
    short_data = _read_to_end(short, short_head)
    long_data = _read_to_end(long, long_head)
    code = gw.proc.wait(timeout=20)
    assert code == 0 and time.monotonic() - term_at < 2 + 2.5
    assert b"data: [DONE]" in short_data and b"data: [DONE]" not in long_data
    out = gw.output()
    done = [json.loads(line) for line in out.splitlines()
            if '"request.done"' in line and "/v1/chat/completions" in line]
    assert len(done) == 2, out[-3000:]
    assert "worker.graceful_timeout" in out and "Worker exiting" in out


def test_hup_applies_health_settings_to_kept_backends(mock_backend: Any, gateway: Any) -> None:
    # The audit: a HUP's new thresholds reached only backends it added, and switching probes off
    # left an unhealthy backend out of rotation for good (no probe could bring it back).
    a, b = mock_backend("a"), mock_backend("b")
    gw = gateway([a, b], workers=1, config={"health": {**FAST_HEALTH, "unhealthy_threshold": 100}})
    gw.write_config({"health": {"unhealthy_threshold": 2}})
    gw.reload()
    wait_until(lambda: gw.output().count("config.reloaded") >= 1, timeout=5)
    b.control(health_fail=True)
    wait_until(lambda: gw.health()[1]["backends"]["healthy"] == 1, timeout=5, what="b unhealthy after 2 probes")
    gw.write_config({"health": {"enabled": False}})
    gw.reload()
    wait_until(lambda: gw.output().count("config.reloaded") >= 2, timeout=5)
    b.control(health_fail=False)
    assert gw.health()[1]["backends"] == {"healthy": 2, "total": 2}
    served = Counter(gw.request("POST", "/v1/chat/completions", {"model": "m", "messages": []},
                                headers={"Cache-Control": "no-store"})[1].get("x-mock-instance") for _ in range(6))
    assert served == {"a": 3, "b": 3}
