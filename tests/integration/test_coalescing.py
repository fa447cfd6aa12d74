"""Request coalescing through a live gateway with 2 workers (INTERFACE.md "Cache", ADR 0003).

Identical cacheable requests in flight at once reach the backend once; the others get the
same answer (``X-Cache: HIT``), streamed ones as it streams, whichever worker they landed on.
Each request runs on its own connection in a thread (``Call``), read with a raw socket so
that arrival times are the client's own. The mock makes the answer slow (``X-Mock-TTFT``, not
part of the cache key), so that all requests are in flight together.

Followers must span processes: an idle gevent worker tends to accept nearly every new
connection, so the test steers them (``only_worker`` stops the other worker for a moment)
and checks in the access log that the answers came from both workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_cache import access_log, chat_body, only_worker, post, worker_pids
from tests.live.procs import wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
N = 20


class Call(threading.Thread):
    """One POST on its own connection, run in a thread: status, headers, body pieces with their
    arrival times (seconds since ``t0``), and whether the body ended cleanly."""

    def __init__(self, port: int, body: dict[str, Any], headers: dict[str, str], t0: float,
                 timeout: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.port, self.t0, self.timeout = port, t0, timeout
        self.request_id = f"co{uuid.uuid4().hex}"
        self.payload = json.dumps(body).encode()
        self.headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json",
                        "Content-Length": str(len(self.payload)), "X-Request-ID": self.request_id,
                        "Connection": "close", **headers}
        self.status = 0
        self.response_headers: dict[str, str] = {}
        self.pieces: list[tuple[float, bytes]] = []
        self.complete = False
        self.error = ""
        self.ended_at: float | None = None

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.pieces)

    @property
    def cache(self) -> str:
        return self.response_headers.get("x-cache", "")

    def first_event_at(self) -> float:
        return next(t for t, data in self.pieces if b"data: " in data)

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as sock:
                head = f"POST {CHAT} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
                sock.sendall(head.encode("latin-1") + b"\r\n" + self.payload)
                self._read(sock)
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic() - self.t0

    def _read(self, sock: socket.socket) -> None:
        buf = b""

        def fill() -> bool:
            nonlocal buf
            data = sock.recv(65536)
            buf += data
            return bool(data)

        while b"\r\n\r\n" not in buf:
            if not fill():
                raise ConnectionError(f"closed before the response head: {buf!r}")
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.response_headers[name.strip().lower()] = value.strip()
        if "content-length" in self.response_headers:
            want = int(self.response_headers["content-length"])
            got = 0
            while True:
                if buf:
                    self.pieces.append((time.monotonic() - self.t0, buf))
                    got += len(buf)
                    buf = b""
                if got >= want:
                    self.complete = got == want
                    return
                if not fill():
                    return
        while True:  # chunked
            while b"\r\n" not in buf:
                if not fill():
                    return
            size_line, _, rest = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                if not fill():
                    return
                size_line, _, rest = buf.partition(b"\r\n")
            data, buf = rest[:size], rest[size + 2:]
            if size == 0:
                self.complete = True
                return
            self.pieces.append((time.monotonic() - self.t0, data))


def start_calls(gw: Gateway, n: int, body: dict[str, Any], headers: dict[str, str], t0: float) -> list[Call]:
    calls = [Call(gw.port, body, headers, t0) for _ in range(n)]
    for c in calls:
        c.start()
    return calls


def finish(calls: list[Call], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    for c in calls:
        c.join(max(0.0, deadline - time.monotonic()))
    hung = [c.request_id for c in calls if c.is_alive()]
    assert not hung, f"{len(hung)} requests still waiting after {timeout}s"


def steered_burst(gw: Gateway, workers: list[int], body: dict[str, Any], headers: dict[str, str],
                  leader_at_backend: Any) -> tuple[list[Call], float]:
    """N identical requests in flight together: the first ones on worker A (the first reaches
    the backend: ``leader_at_backend()``), the rest on worker B. Returns the calls and t0."""
    a, b = workers
    t0 = time.monotonic()
    with only_worker(gw, a, workers):
        calls = start_calls(gw, 1, body, headers, t0)
        wait_until(leader_at_backend, timeout=5, interval=0.01, what="the leader at the backend")
        calls += start_calls(gw, N // 2 - 1, body, headers, t0)
        _until_active(gw, N // 2)  # accepted and joined by a (fixed sleeps lost some to b under load)
    with only_worker(gw, b, workers):
        calls += start_calls(gw, N - N // 2, body, headers, t0)
        _until_active(gw, N)
    return calls, t0


def _until_active(gw: Gateway, n: int) -> None:
    """Until ``n`` requests are in progress in the gateway (the /metrics request asking aside):
    accepted and counted by the worker that is not stopped."""
    wait_until(lambda: gw.metrics()["requests_active"] >= n + 1, timeout=10, interval=0.01,
               what=f"{n} requests in progress")


def pids_of(gw: Gateway, calls: list[Call]) -> dict[str, int]:
    ids = {c.request_id for c in calls}
    records = wait_until(lambda: (r := access_log(gw, ids)) and len(r) == len(ids) and r, timeout=5,
                         what="access log lines")
    return {rid: rec["pid"] for rid, rec in records.items()}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("co")


@pytest.fixture(scope="module")
def gw(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    # Some tests make the backend answer errors on purpose: the breaker must not eject it.
    return gateway_module([mock], workers=2, config={"circuit_breaker": {"failure_threshold": 10_000}})


# ----------------------------------------------------------------------------- tests


def test_twenty_concurrent_plain_requests_reach_the_backend_once(gw: Gateway, mock: MockBackend) -> None:
    workers = worker_pids(gw)
    body = chat_body()
    before = mock.stats()
    calls, _ = steered_burst(gw, workers, body, {"X-Mock-TTFT": "1.0"},
                             lambda: mock.stats()["active_requests"] >= 1)
    finish(calls)
    assert [c.error for c in calls if c.error] == []
    assert [(c.status, c.complete) for c in calls] == [(200, True)] * N
    assert mock.stats()["requests"] - before["requests"] == 1, "coalescing let requests through"
    assert len({c.body for c in calls}) == 1, "not all got the same answer"
    assert sorted(c.cache for c in calls) == ["HIT"] * (N - 1) + ["MISS"]
    pids = pids_of(gw, calls)
    leader = next(c for c in calls if c.cache == "MISS")
    assert {pids[c.request_id] for c in calls} == set(workers)
    assert any(pids[c.request_id] != pids[leader.request_id] for c in calls), "no follower in the other worker"
    # Stored as well: the next one is an ordinary hit.
    assert post(gw, body)[1]["x-cache"] == "HIT"
    assert mock.stats()["requests"] - before["requests"] == 1


def test_twenty_concurrent_streams_reach_the_backend_once_and_stream_to_followers(
        gw: Gateway, mock: MockBackend) -> None:
    workers = worker_pids(gw)
    body = chat_body(stream=True)
    headers = {"X-Mock-TTFT": "1.5", "X-Mock-Token-Delay": "0.1", "X-Mock-Tokens": "10"}
    before = mock.stats()
    calls, _ = steered_burst(gw, workers, body, headers,
                             lambda: mock.stats()["streams_started"] > before["streams_started"])
    finish(calls)
    after = mock.stats()
    assert [c.error for c in calls if c.error] == []
    assert [(c.status, c.complete) for c in calls] == [(200, True)] * N
    assert after["streams_started"] - before["streams_started"] == 1
    assert after["requests"] - before["requests"] == 1
    bodies = {c.body for c in calls}
    assert len(bodies) == 1, "streams differ"
    whole = bodies.pop()
    assert whole.count(b"data: ") == 11 and whole.endswith(b"data: [DONE]\n\n")
    assert sorted(c.cache for c in calls) == ["HIT"] * (N - 1) + ["MISS"]
    assert all(c.response_headers["content-type"].startswith("text/event-stream") for c in calls)
    leader = next(c for c in calls if c.cache == "MISS")
    leader_end = leader.pieces[-1][0]
    leader_first = leader.first_event_at()
    assert leader_end - leader_first >= 0.7, (leader_first, leader_end)
    for c in calls:
        if c is leader:
            continue
        first, last = c.first_event_at(), c.pieces[-1][0]
        # Events as the leader produces them: the first one long before the leader's last,
        # and the follower's own events spread over the stream, not in one burst at the end.
        assert first < leader_end - 0.5, f"follower's first event at {first:.2f}s, leader ended {leader_end:.2f}s"
        assert last - first >= 0.5, f"follower got its events in a burst ({first:.2f}s..{last:.2f}s)"
    pids = pids_of(gw, calls)
    assert any(pids[c.request_id] != pids[leader.request_id] for c in calls), "no follower in the other worker"
    assert post(gw, body)[1]["x-cache"] == "HIT"
    assert mock.stats()["streams_started"] - before["streams_started"] == 1


def test_leader_that_fails_shares_the_error_and_nobody_hangs(gw: Gateway, mock: MockBackend) -> None:
    """The backend fails the leader's request while 19 identical ones wait for it."""
    body = chat_body()
    before = mock.stats()["requests"]
    mock.control(hang=True)  # requests reach the mock and wait there
    try:
        t0 = time.monotonic()
        calls = start_calls(gw, N, body, {}, t0)
        wait_until(lambda: mock.stats()["active_requests"] >= 1, timeout=5, interval=0.01,
                   what="the leader at the backend")
        time.sleep(0.4)  # the others join the leader's flight
        mock.control(fail=True, hang=False)  # the waiting request is answered 500
        released = time.monotonic() - t0
        finish(calls, timeout=10)
    finally:
        mock.control(fail=False, hang=False)
    assert [c.error for c in calls if c.error] == []
    assert [(c.status, c.complete) for c in calls] == [(500, True)] * N
    assert max(c.ended_at or 99.0 for c in calls) - released < 3.0, [c.ended_at for c in calls]
    assert len({c.body for c in calls}) == 1 and b"failing on purpose" in calls[0].body
    assert mock.stats()["requests"] - before == 1, "the followers did not wait for the leader"
    # An error is never stored: the same request is answered by the backend again.
    s, h, _ = post(gw, body)
    assert (s, h["x-cache"]) == (200, "MISS")


def test_error_after_a_finished_error_is_not_served_again(gw: Gateway, mock: MockBackend) -> None:
    """A request sent right after an error answer arrived is not handed that error (it would
    follow the old flight if the leader had not closed it yet): it reaches the backend."""
    body = chat_body()
    before = mock.stats()["requests"]
    for i in range(50):
        s, h, _ = post(gw, body, {"X-Mock-Status": "503"})
        assert (s, h["x-cache"]) == (503, "MISS"), f"request {i + 1}: {s} {h.get('x-cache')}"
    assert mock.stats()["requests"] - before == 50


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_leader_that_fails_before_its_answer_leaves_followers_to_ask_themselves(
        mock_backend: MockBackendFactory, gateway: GatewayFactory) -> None:
    """The mock process serving the leader is killed: the leader's request was answered by
    nothing, on a backend that still accepts connections (its master respawns the worker), so
    the gateway does not send it twice: the leader's client gets an error. The followers must
    not hang on it: they go to a backend themselves."""
    a, b = mock_backend("da"), mock_backend("db")
    gw2 = gateway([a, b], workers=2, config={"circuit_breaker": {"failure_threshold": 1000}})
    body = chat_body()
    t0 = time.monotonic()
    calls = start_calls(gw2, 1, body, {"X-Mock-TTFT": "1.0"}, t0)
    victim = wait_until(lambda: next((m for m in (a, b) if m.stats()["active_requests"] >= 1), None),
                        timeout=5, interval=0.01, what="the leader at a backend")
    calls += start_calls(gw2, N - 1, body, {"X-Mock-TTFT": "1.0"}, t0)
    time.sleep(0.3)  # the followers wait for the leader's answer
    (worker,) = children_of(victim.proc.pid)
    os.kill(worker, signal.SIGKILL)  # the mock's worker, holding the leader's request
    killed = time.monotonic() - t0
    finish(calls, timeout=10)
    print("after the kill: " + ", ".join(f"{c.status} {c.cache} +{(c.ended_at or 0) - killed:.2f}s" for c in calls))
    assert [c.error for c in calls if c.error] == []
    late = [round(c.ended_at - killed, 2) for c in calls if c.ended_at is not None and c.ended_at - killed > 4.0]
    assert not late, f"answers came more than 4 s after the leader's backend died: {late}"
    assert all(c.complete for c in calls)
    leader, followers = calls[0], calls[1:]  # the first was alone at the backend
    assert leader.status == 502, leader.status
    assert sum(c.status == 200 for c in followers) >= N // 2, [c.status for c in followers]
    assert all(c.status in (200, 502, 503) for c in followers)


def test_broken_leader_stream_cuts_followers_without_hanging(gw: Gateway, mock: MockBackend) -> None:
    body = chat_body(stream=True)
    headers = {"X-Mock-TTFT": "0.5", "X-Mock-Token-Delay": "0.1", "X-Mock-Tokens": "10", "X-Mock-Break-After": "3"}
    before = mock.stats()
    t0 = time.monotonic()
    calls = start_calls(gw, N, body, headers, t0)
    finish(calls, timeout=10)
    assert max(c.ended_at or 99.0 for c in calls) < 4.0
    assert all(c.status in (200, 502) for c in calls)
    assert not any(c.complete and c.status == 200 for c in calls), "a broken stream ended cleanly"
    assert all(b"[DONE]" not in c.body for c in calls)
    assert mock.stats()["streams_broken"] > before["streams_broken"]
    # Nothing stored: the same request, unbroken, reaches the backend.
    n = mock.stats()["streams_started"]
    s, h, whole = post(gw, body, {"X-Mock-Tokens": "4"})
    assert (s, h["x-cache"]) == (200, "MISS") and whole.endswith(b"data: [DONE]\n\n")
    assert mock.stats()["streams_started"] == n + 1


def test_followers_survive_the_leaders_client_leaving(gw: Gateway, mock: MockBackend) -> None:
    """The leader's client goes away mid-stream: followers end (complete or cut) promptly."""
    body = chat_body(stream=True)
    headers = {"X-Mock-TTFT": "0.3", "X-Mock-Token-Delay": "0.1", "X-Mock-Tokens": "10"}
    t0 = time.monotonic()
    payload = json.dumps(body).encode()
    leader = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()))
        leader.sendall(head.encode() + b"\r\n" + payload)
        got = b""
        while b"data: " not in got:
            chunk = leader.recv(65536)
            assert chunk, got
            got += chunk
        assert b"X-Cache: MISS" in got
        calls = start_calls(gw, 5, body, headers, t0)
        time.sleep(0.2)
    finally:
        leader.close()
    finish(calls, timeout=8)
    assert [c.error for c in calls if c.error] == []
    ends = [c.ended_at for c in calls]
    assert max(e or 99.0 for e in ends) < 5.0, ends
    for c in calls:
        assert c.status == 200
        if c.complete:  # followed to the end, or asked the backend itself: a whole stream
            assert c.body.endswith(b"data: [DONE]\n\n")


# A streamed answer of ~1.4 MB: above what a leader once kept for a follower who might come
# (1 MiB), below cache.max_entry_bytes (4 MiB by default), so it is stored.
BIG = {"X-Mock-Tokens": "7000", "X-Mock-Token-Delay": "0"}


def test_a_large_stored_stream_is_a_hit_for_a_request_sent_right_after_it(gw: Gateway, mock: MockBackend) -> None:
    """The client has read the whole stream and asks again at once, on a new connection (either
    worker): the answer is in the cache or its flight is still there to follow, never a second
    backend request."""
    before = mock.stats()["requests"]
    for _ in range(5):
        body = chat_body(stream=True)
        first = Call(gw.port, body, BIG, time.monotonic())
        first.run()
        assert (first.status, first.complete, first.cache) == (200, True, "MISS"), first.error
        assert len(first.body) > 1_100_000 and first.body.endswith(b"data: [DONE]\n\n")
        again = Call(gw.port, body, BIG, time.monotonic())
        again.run()
        assert (again.status, again.complete, again.cache) == (200, True, "HIT"), again.error
        assert again.body == first.body
    assert mock.stats()["requests"] - before == 5


def test_an_identical_request_joins_a_large_stream_past_its_first_mebibyte(gw: Gateway, mock: MockBackend) -> None:
    """Arriving when the leader has relayed more than 1 MiB of an answer the cache will store,
    an identical request follows the flight from the answer's first byte."""
    body = chat_body(stream=True)
    headers = {"X-Mock-Tokens": "7000", "X-Mock-Token-Delay": "0.0004"}  # ~3 s of stream
    before = mock.stats()["requests"]
    t0 = time.monotonic()
    leader = Call(gw.port, body, headers, t0)
    leader.start()
    wait_until(lambda: sum(len(p) for _, p in leader.pieces) > 1_100_000, timeout=10, interval=0.01,
               what="the leader's client past 1.1 MB")
    assert leader.is_alive(), "the stream ended before the second request could join it"
    second = start_calls(gw, 1, body, headers, t0)[0]
    finish([leader, second], timeout=20)
    assert [leader.error, second.error] == ["", ""]
    assert (leader.status, leader.complete, leader.cache) == (200, True, "MISS")
    assert (second.status, second.complete, second.cache) == (200, True, "HIT")
    assert second.body == leader.body and leader.body.endswith(b"data: [DONE]\n\n")
    assert mock.stats()["requests"] - before == 1


def test_identical_requests_behind_a_stalled_backend_get_504_within_their_own_timeout(
        mock: MockBackend, gateway_module: GatewayFactory) -> None:
    """proxy.read_timeout_s bounds each request's wait for response headers, coalesced or not:
    a leader that timed out shares its 504 with its followers, instead of letting them regroup
    behind a new leader and wait the timeout again (they did: 2, 4, 6 and 6 s for a timeout of
    2 s)."""
    gw = gateway_module([mock], workers=2, config={"proxy": {"read_timeout_s": 2}})
    body = chat_body()
    before = mock.stats()["requests"]
    t0 = time.monotonic()
    calls = start_calls(gw, 1, body, {"X-Mock-TTFT": "30"}, t0)
    wait_until(lambda: mock.stats()["requests"] > before, timeout=5, interval=0.01, what="the leader at the backend")
    calls += start_calls(gw, 3, body, {"X-Mock-TTFT": "30"}, t0)
    finish(calls, timeout=20)
    assert [c.error for c in calls if c.error] == []
    assert [c.status for c in calls] == [504] * 4
    ends = sorted(c.ended_at or 99.0 for c in calls)
    assert ends[-1] < 3.5, f"answers at {ends} s for a timeout of 2 s"
    assert mock.stats()["requests"] - before == 1
