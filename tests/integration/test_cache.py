"""The response cache through a live gateway (INTERFACE.md "Cache").

Every test sends prompts of its own (a uuid in the message), so answers cached by one test
never serve another; whether the backend was called is read from the mock's ``/_stats``
``requests`` counter before and after. The mock numbers its answers (``"id":
"chatcmpl-<name>-<n>"``), so two byte-identical bodies can only come from one backend call.

Most tests share one gateway with 2 workers (whose cache lives in its own ``cache.dir``);
TTL and the byte bound get gateways of their own with small limits.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.live.procs import wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
PURGE_TOKEN = "purge-secret-0123456789"
STATS_KEYS = {"enabled", "entries", "size_bytes", "max_size_bytes", "hits", "misses", "hit_rate", "evictions"}


# ----------------------------------------------------------------------------- helpers


def chat_body(prompt: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": prompt or f"q {uuid.uuid4()}"}],
            **extra}


# Request ids sent to each gateway (by port) whose access log line has not been seen yet.
_UNSETTLED: dict[int, set[str]] = {}
_UNSETTLED_LOCK = threading.Lock()


def post(gw: Gateway, body: dict[str, Any] | bytes, headers: Mapping[str, str] | None = None,
         path: str = CHAT, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One POST on a fresh connection (urllib opens one per request), with its own request id."""
    hdrs = {"Content-Type": "application/json", "X-Request-ID": f"t{uuid.uuid4().hex}", **(headers or {})}
    with _UNSETTLED_LOCK:
        _UNSETTLED.setdefault(gw.port, set()).add(hdrs["X-Request-ID"])
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return gw.request("POST", path, data, headers=hdrs, timeout=timeout)


def settled(gw: Gateway) -> None:
    """Wait until the gateway logged every request ``post`` sent it: the client has its answer
    before the worker stores it and ends the flight; the access log line comes after both."""
    with _UNSETTLED_LOCK:
        pending = set(_UNSETTLED.get(gw.port, ()))
    if pending:
        wait_until(lambda: len(access_log(gw, pending)) == len(pending), timeout=10,
                   what="the gateway to finish its requests")
        with _UNSETTLED_LOCK:
            _UNSETTLED[gw.port] -= pending


def backend_calls(mock: MockBackend) -> int:
    return int(mock.stats()["requests"])


def parallel(n: int, fn: Any) -> list[Any]:
    """``fn(i)`` for i in range(n) on n threads released at once; results in order."""
    barrier = threading.Barrier(n, timeout=10)

    def run(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def access_log(gw: Gateway, request_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The gateway's ``request.done`` records of those request ids (JSON log lines)."""
    found: dict[str, dict[str, Any]] = {}
    for line in gw.output().splitlines():
        if '"request.done"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("request_id") in request_ids:
            found[rec["request_id"]] = rec
    return found


def worker_pids(gw: Gateway, count: int = 2) -> list[int]:
    """The PIDs of the gateway's worker processes (children of its master), once all are up."""

    def children() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == gw.pid:
                found.append(int(entry.name))
        return sorted(found) if len(found) == count else []

    return wait_until(children, timeout=10, what=f"{count} workers of {gw!r}")


@contextlib.contextmanager
def only_worker(gw: Gateway, pid: int, workers: list[int]) -> Iterator[None]:
    """Let only worker ``pid`` accept connections: the others are stopped (SIGSTOP) meanwhile.

    Which worker accepts a new connection is otherwise up to the kernel, and an idle gevent
    worker tends to take nearly all of them; this makes "served by the other worker" certain.
    The workers are idle when paused (every request sent has been logged, and no transaction
    is ever held between calls), and the pause is far shorter than gunicorn's 30 s heartbeat
    timeout."""
    others = [p for p in workers if p != pid]
    settled(gw)  # never stop a worker in the middle of a store (it would hold the store's lock)
    try:
        for other in others:
            os.kill(other, signal.SIGSTOP)
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def served_by(gw: Gateway, request_ids: set[str]) -> dict[str, dict[str, Any]]:
    """Wait for the access log lines of ``request_ids``; request id -> record."""
    return wait_until(lambda: (r := access_log(gw, request_ids)) and len(r) == len(request_ids) and r,
                      timeout=5, what="access log lines")


def read_broken(gw: Gateway, body: dict[str, Any], headers: Mapping[str, str]) -> tuple[int, bytes, bool]:
    """POST and read what arrives of a body that may be cut: (status, bytes, complete)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST", CHAT, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        try:
            return resp.status, resp.read(), True
        except http.client.IncompleteRead as exc:
            return resp.status, exc.partial, False
    finally:
        conn.close()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("c")


@pytest.fixture(scope="module")
def gw(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([mock], workers=2, config={"cache": {"purge_token": PURGE_TOKEN}})


# ----------------------------------------------------------------------------- hits and keys


def test_second_identical_request_is_a_hit_without_backend_call(gw: Gateway, mock: MockBackend) -> None:
    body = chat_body()
    before = backend_calls(mock)
    s1, h1, b1 = post(gw, body)
    assert (s1, h1.get("x-cache")) == (200, "MISS"), (s1, h1, b1[:300])
    assert backend_calls(mock) == before + 1
    s2, h2, b2 = post(gw, body)
    assert (s2, h2.get("x-cache")) == (200, "HIT"), (s2, h2)
    assert b2 == b1
    assert h2["content-type"].startswith("application/json")
    assert h2.get("x-request-id") and h2["x-request-id"] != h1.get("x-request-id")
    assert backend_calls(mock) == before + 1, "the hit reached the backend"


def test_key_ignores_key_order_and_whitespace(gw: Gateway, mock: MockBackend) -> None:
    prompt = f"order {uuid.uuid4()}"
    first = json.dumps({"model": "mock-model", "temperature": 0.5,
                        "messages": [{"role": "user", "content": prompt}]}).encode()
    # Same JSON value: keys in another order (nested too), other spacing and newlines.
    second = (b'{\n  "messages" : [ { "content" : ' + json.dumps(prompt).encode() + b',   "role":"user"} ],\n'
              b'\t"temperature":0.5 ,"model":   "mock-model"}')
    assert json.loads(first) == json.loads(second) and first != second
    before = backend_calls(mock)
    s1, h1, b1 = post(gw, first)
    s2, h2, b2 = post(gw, second)
    assert (s1, h1["x-cache"], s2, h2["x-cache"]) == (200, "MISS", 200, "HIT")
    assert b2 == b1
    assert backend_calls(mock) == before + 1


@pytest.mark.parametrize(("change", "headers"), [
    ({"temperature": 0.9}, {}),
    ({"model": "other-model"}, {}),
    ({}, {"Authorization": "Bearer key-b"}),
    ({}, {}),  # no Authorization at all is a partition of its own too
], ids=["temperature", "model", "authorization", "no-authorization"])
def test_other_temperature_model_or_authorization_is_a_miss(
        gw: Gateway, mock: MockBackend, change: dict[str, Any], headers: dict[str, str]) -> None:
    base = chat_body(temperature=0.2)
    auth_a = {"Authorization": "Bearer key-a"}
    s, h, original = post(gw, base, auth_a)
    assert (s, h["x-cache"]) == (200, "MISS")
    assert post(gw, base, auth_a)[1]["x-cache"] == "HIT"
    before = backend_calls(mock)
    s, h, other = post(gw, {**base, **change}, headers)
    assert (s, h["x-cache"]) == (200, "MISS"), (change, headers, h)
    assert other != original
    assert backend_calls(mock) == before + 1
    # ... and the original is still cached for its own credential.
    s, h, again = post(gw, base, auth_a)
    assert (h["x-cache"], again) == ("HIT", original)


def test_the_query_string_is_part_of_the_key(gw: Gateway, mock: MockBackend) -> None:
    """``?api-version=...`` may change the answer: each query its own entry (the fast hit path
    included), the request without one as before."""
    body = chat_body()
    before = backend_calls(mock)
    targets = (CHAT, CHAT + "?api-version=1", CHAT + "?api-version=2")
    for target in targets:
        s, h, _ = post(gw, body, path=target)
        assert (s, h["x-cache"]) == (200, "MISS"), target
    assert backend_calls(mock) == before + 3
    for _ in range(3):  # on both workers, through L2 and then the fast path's L1
        for target in targets:
            s, h, _ = post(gw, body, path=target)
            assert (s, h["x-cache"]) == (200, "HIT"), target
    assert backend_calls(mock) == before + 3


# ----------------------------------------------------------------------------- Cache-Control


def test_no_cache_goes_to_the_backend_and_stores_the_fresh_answer(gw: Gateway, mock: MockBackend) -> None:
    workers = worker_pids(gw)
    body = chat_body()
    for pid in workers:  # the old answer is in both workers' memory tier
        with only_worker(gw, pid, workers):
            _, h, old = post(gw, body)
            assert h["x-cache"] in ("MISS", "HIT")
    before = backend_calls(mock)
    with only_worker(gw, workers[0], workers):
        s, h, fresh = post(gw, body, {"Cache-Control": "no-cache"})
    assert s == 200 and h["x-cache"] in ("MISS", "BYPASS"), h
    assert backend_calls(mock) == before + 1, "no-cache was served from the cache"
    assert fresh != old
    # Stored, and no worker serves the replaced answer any more.
    for pid in workers:
        with only_worker(gw, pid, workers):
            s, h, later = post(gw, body)
            assert (h["x-cache"], later) == ("HIT", fresh), f"worker {pid}: the fresh answer is not served"
    assert backend_calls(mock) == before + 1


def test_no_store_is_neither_served_nor_stored(gw: Gateway, mock: MockBackend) -> None:
    # A new prompt with no-store: not kept.
    body = chat_body()
    before = backend_calls(mock)
    s, h, first = post(gw, body, {"Cache-Control": "no-store"})
    assert s == 200 and h["x-cache"] == "BYPASS", h
    s, h, second = post(gw, body)
    assert h["x-cache"] == "MISS" and second != first, "a no-store answer was stored"
    assert backend_calls(mock) == before + 2
    # A cached prompt with no-store: not served from the cache, and the cached answer stays.
    s, h, third = post(gw, body, {"Cache-Control": "no-store"})
    assert h["x-cache"] == "BYPASS" and third not in (first, second)
    assert backend_calls(mock) == before + 3
    s, h, fourth = post(gw, body)
    assert (h["x-cache"], fourth) == ("HIT", second)


def test_only_status_200_is_stored(gw: Gateway, mock: MockBackend) -> None:
    body = chat_body()
    before = backend_calls(mock)
    for _ in range(2):
        s, h, err = post(gw, body, {"X-Mock-Status": "500"})
        assert s == 500 and h["x-cache"] == "MISS", (s, h)
        assert b"X-Mock-Status" in err
    assert backend_calls(mock) == before + 2, "a 500 answer was served from the cache"
    s, h, ok = post(gw, body)  # the header is not part of the key
    assert (s, h["x-cache"]) == (200, "MISS")
    assert backend_calls(mock) == before + 3
    assert post(gw, body)[1]["x-cache"] == "HIT"


# ----------------------------------------------------------------------------- workers and stats


def test_two_workers_twenty_fresh_connections_all_hit(gw: Gateway, mock: MockBackend) -> None:
    workers = worker_pids(gw)
    body = chat_body()
    before = backend_calls(mock)
    _, h, warm = post(gw, body)
    assert h["x-cache"] == "MISS"
    ids = []
    results = []
    for pid in workers:  # 10 fresh connections served by each worker
        with only_worker(gw, pid, workers):
            for _ in range(10):
                ids.append(rid := f"fresh{uuid.uuid4().hex}")
                results.append(post(gw, body, {"X-Request-ID": rid}))
    assert [(s, h.get("x-cache")) for s, h, _ in results] == [(200, "HIT")] * 20
    assert all(b == warm for _, _, b in results)
    assert backend_calls(mock) == before + 1
    records = served_by(gw, set(ids))
    assert {rec["pid"] for rec in records.values()} == set(workers)
    assert all(rec["cache"] == "HIT" for rec in records.values())
    # ... and the same without steering: 20 at once, each on its own connection.
    results = parallel(20, lambda i: post(gw, body))
    assert [(s, h.get("x-cache"), b) for s, h, b in results] == [(200, "HIT", warm)] * 20
    assert backend_calls(mock) == before + 1


def _keep_alive(gw: Gateway, pid: int, workers: list[int]) -> http.client.HTTPConnection:
    """A keep-alive connection that worker ``pid`` accepted (and so serves to its end)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    with only_worker(gw, pid, workers):
        conn.connect()
        rid = f"ka{uuid.uuid4().hex}"
        status, _, _ = _post_on(conn, json.dumps(chat_body()).encode(), rid)
        assert status == 200
        assert served_by(gw, {rid})[rid]["pid"] == pid
    return conn


def _post_on(conn: http.client.HTTPConnection, data: bytes, rid: str) -> tuple[int, str, bytes]:
    conn.request("POST", CHAT, data, {"Content-Type": "application/json", "X-Request-ID": rid})
    resp = conn.getresponse()
    return resp.status, resp.getheader("X-Cache") or "", resp.read()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_an_answer_is_a_hit_for_an_identical_request_sent_at_once_to_the_other_worker(
        gw: Gateway, mock: MockBackend, stream: bool) -> None:
    """A worker writes its answers to the host's store in batches, once per turn of its event
    loop: the flight stays up until then, so a request the client sends the moment it has the
    answer, to the other worker, follows it or finds it stored; it never reaches the backend.
    Misses from other clients keep both workers busy meanwhile (longer turns)."""
    workers = worker_pids(gw)
    a, b = (_keep_alive(gw, pid, workers) for pid in workers)
    settled(gw)
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            post(gw, chat_body())

    loaders = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in loaders:
        t.start()
    outcomes = []
    try:
        for i in range(150):
            first, second = (a, b) if i % 2 == 0 else (b, a)
            data = json.dumps(chat_body(stream=True) if stream else chat_body()).encode()
            s1, c1, b1 = _post_on(first, data, f"x{uuid.uuid4().hex}")
            s2, c2, b2 = _post_on(second, data, f"y{uuid.uuid4().hex}")
            outcomes.append((s1, c1, s2, c2, b2 == b1))
    finally:
        stop.set()
        for t in loaders:
            t.join(timeout=15)
        a.close()
        b.close()
    assert [o for o in outcomes if o != (200, "MISS", 200, "HIT", True)] == []


def test_stats_cover_the_whole_gateway(gw: Gateway, mock: MockBackend) -> None:
    workers = worker_pids(gw)
    # The previous test's last answer is counted when its request ends, just after the client
    # has it: wait until only the asking request is in progress.
    wait_until(lambda: gw.metrics()["requests_active"] == 1, timeout=10, what="earlier requests counted")
    before = gw.cache_stats()
    assert set(before) >= STATS_KEYS, before
    assert before["enabled"] is True
    assert before["max_size_bytes"] == 512 * 1024 * 1024  # the default cache.max_size_mb
    bodies = [chat_body() for _ in range(4)]
    # Misses and hits on both workers: 2 misses + 3 hits on one, 2 misses + 5 hits on the other.
    for pid, mine, hits, stored in ((workers[0], bodies[:2], 3, 2), (workers[1], bodies[2:], 5, 4)):
        with only_worker(gw, pid, workers):
            for body in mine:
                assert post(gw, body)[1]["x-cache"] == "MISS"
            for i in range(hits):
                assert post(gw, bodies[i % stored])[1]["x-cache"] == "HIT"
    # Each worker answers for the whole gateway.
    answers = []
    for pid in workers:
        with only_worker(gw, pid, workers):
            answers.append(gw.cache_stats())
    for after in answers:
        assert after["hits"] - before["hits"] == 8, (before, after)
        assert after["misses"] - before["misses"] == 4, (before, after)
        assert after["entries"] - before["entries"] == 4, (before, after)
        assert after["size_bytes"] > before["size_bytes"]
        assert after["hit_rate"] == pytest.approx(after["hits"] / (after["hits"] + after["misses"]), abs=1e-3)
    # A bypass counts neither as a hit nor as a miss.
    post(gw, bodies[0], {"Cache-Control": "no-store"})
    last = gw.cache_stats()
    assert (last["hits"], last["misses"]) == (answers[0]["hits"], answers[0]["misses"])


def test_purge_needs_the_token_and_clears_every_worker(gw: Gateway, mock: MockBackend) -> None:
    workers = worker_pids(gw)
    body = chat_body()
    _, _, old = post(gw, body)
    for pid in workers:  # now in both workers' memory tier
        with only_worker(gw, pid, workers):
            assert post(gw, body)[1]["x-cache"] == "HIT"
    assert gw.cache_stats()["entries"] >= 1
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": PURGE_TOKEN + "x"}):
        s, _, err = gw.request("POST", "/cache/purge", b"", headers=headers)
        assert s == 403, (headers, s, err)
        assert "error" in json.loads(err)
    assert post(gw, body)[1]["x-cache"] == "HIT", "a refused purge removed entries"

    with only_worker(gw, workers[0], workers):
        s, _, answer = gw.request("POST", "/cache/purge", b"", headers={"Authorization": f"Bearer {PURGE_TOKEN}"})
    assert s == 200, answer
    assert json.loads(answer)["purged"] >= 1
    stats = gw.cache_stats()
    assert (stats["entries"], stats["size_bytes"]) == (0, 0), stats
    before = backend_calls(mock)
    # The other worker must not serve the purged answer from its memory.
    with only_worker(gw, workers[1], workers):
        s, h, fresh = post(gw, body)
    assert (s, h["x-cache"]) == (200, "MISS") and fresh != old, "a worker served a purged entry"
    for pid in workers:
        with only_worker(gw, pid, workers):
            s, h, again = post(gw, body)
            assert (h["x-cache"], again) == ("HIT", fresh)
    assert backend_calls(mock) == before + 1


# ----------------------------------------------------------------------------- streams


def test_streamed_answer_replays_byte_identical(gw: Gateway, mock: MockBackend) -> None:
    body = chat_body(stream=True)
    before = mock.stats()
    s1, h1, b1 = post(gw, body, {"X-Mock-Tokens": "12"})
    assert (s1, h1["x-cache"]) == (200, "MISS")
    assert h1["content-type"].startswith("text/event-stream")
    assert b1.endswith(b"data: [DONE]\n\n") and b1.count(b"data: ") == 13
    s2, h2, b2 = post(gw, body)
    assert (s2, h2["x-cache"]) == (200, "HIT")
    assert h2["content-type"].startswith("text/event-stream")
    assert b2 == b1
    after = mock.stats()
    assert after["streams_started"] == before["streams_started"] + 1
    assert after["requests"] == before["requests"] + 1


def test_broken_stream_is_not_stored(gw: Gateway, mock: MockBackend) -> None:
    body = chat_body(stream=True)
    before = mock.stats()
    status, partial, complete = read_broken(gw, body, {"X-Mock-Break-After": "3", "X-Mock-Tokens": "8"})
    assert status == 200
    assert not complete, "the client saw a clean end of a broken stream"
    assert partial.count(b"data: ") <= 3 and b"[DONE]" not in partial
    wait_until(lambda: mock.stats()["streams_broken"] == before["streams_broken"] + 1, timeout=5,
               what="the mock to count the broken stream")
    s, h, whole = post(gw, body, {"X-Mock-Tokens": "8"})
    assert (s, h["x-cache"]) == (200, "MISS"), "a broken stream was stored"
    assert whole.endswith(b"data: [DONE]\n\n")
    assert backend_calls(mock) == before["requests"] + 2
    assert post(gw, body)[1]["x-cache"] == "HIT"


# ----------------------------------------------------------------------------- bounds


def test_ttl_expiry(mock: MockBackend, gateway: GatewayFactory) -> None:
    gw1 = gateway([mock], config={"cache": {"ttl_seconds": 1}})
    body = chat_body()
    before = backend_calls(mock)
    created = time.monotonic()
    _, h, first = post(gw1, body)
    assert h["x-cache"] == "MISS"
    _, h, second = post(gw1, body)
    assert (h["x-cache"], second) == ("HIT", first)
    assert time.monotonic() - created < 0.9, "too slow to see the hit before expiry"
    time.sleep(max(0.0, 1.5 - (time.monotonic() - created)))
    _, h, third = post(gw1, body)
    assert h["x-cache"] == "MISS" and third != first, "served after its TTL"
    assert backend_calls(mock) == before + 2


def test_byte_bound_holds_while_filling_far_past_it(mock: MockBackend, gateway: GatewayFactory) -> None:
    gw1 = gateway([mock], config={"cache": {"max_size_mb": 0.05}})
    limit = gw1.cache_stats()["max_size_bytes"]
    assert limit == int(0.05 * 1024 * 1024)
    bodies = [chat_body() for _ in range(200)]
    headers = {"X-Mock-Tokens": "330"}  # ~2 KB answers
    sizes = []
    total = 0
    for i, body in enumerate(bodies):
        s, h, answer = post(gw1, body, headers)
        assert (s, h["x-cache"]) == (200, "MISS")
        total += len(answer)
        stats = gw1.cache_stats()
        assert stats["size_bytes"] <= limit, f"after request {i + 1}: {stats}"
        sizes.append(stats["size_bytes"])
    assert 1800 <= total / len(bodies) <= 2600, total / len(bodies)
    assert total > 7 * limit  # filled far past the bound
    stats = gw1.cache_stats()
    assert stats["evictions"] > 0, stats
    assert stats["entries"] < 200 and stats["size_bytes"] > limit / 2, stats  # bounded, yet used
    assert max(sizes) <= limit
    # Least recently used first: the newest answers are there, the first ones are gone.
    before = backend_calls(mock)
    assert post(gw1, bodies[-1], headers)[1]["x-cache"] == "HIT"
    assert post(gw1, bodies[-2], headers)[1]["x-cache"] == "HIT"
    assert backend_calls(mock) == before
    assert post(gw1, bodies[0], headers)[1]["x-cache"] == "MISS"
    assert backend_calls(mock) == before + 1


def test_lru_keeps_what_is_used(mock: MockBackend, gateway: GatewayFactory) -> None:
    """Recency, not insertion order: the oldest entry, read again, outlives younger ones."""
    gw1 = gateway([mock], config={"cache": {"max_size_mb": 0.05}})
    headers = {"X-Mock-Tokens": "330"}  # ~2.5 KB stored per answer: about 20 fit
    first = [chat_body() for _ in range(10)]
    for body in first:
        assert post(gw1, body, headers)[1]["x-cache"] == "MISS"
    assert post(gw1, first[0], headers)[1]["x-cache"] == "HIT"  # the oldest, now the most recent
    for _ in range(16):
        post(gw1, chat_body(), headers)
    assert gw1.cache_stats()["evictions"] > 0
    before = backend_calls(mock)
    assert post(gw1, first[0], headers)[1]["x-cache"] == "HIT", "the recently used entry was evicted"
    assert backend_calls(mock) == before
    assert post(gw1, first[1], headers)[1]["x-cache"] == "MISS", "the least recently used entry was kept"


# ----------------------------------------------------------------------------- the replay tool


def test_replay_tool_reports_hits_against_the_best_possible(gw: Gateway, mock: MockBackend) -> None:
    import subprocess
    import sys

    from tests.live.procs import ROOT

    before = backend_calls(mock)
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "replay"), "--gateway", gw.url, "--generate", "120",
         "--unique", "40", "--concurrency", "8", "--seed", "7", "--stream-fraction", "0.25",
         "--latency-probes", "20", "--json"],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    trace = report["trace"]
    assert trace["requests"] == 120 and trace["unique"] == 40 and trace["errors"] == 0
    assert trace["best_hit_rate"] == pytest.approx(80 / 120, abs=1e-3)
    assert trace["hits"] == 80 and trace["hit_rate"] == trace["best_hit_rate"], trace
    assert trace["backend_requests_saved"] == 80
    latency = report["lookup_latency"]
    assert latency["probes"] == 20 and latency["miss_ms"]["p50"] > 0 and latency["bypass_ms"]["p50"] > 0
    # Trace: 40 backend calls; probes (and their warm-up): one miss and one bypass each.
    assert backend_calls(mock) - before == 40 + 2 * (20 + latency["warmup_pairs"])
    assert re.search(r"hit rate: 66\.7%\s+best possible: 66\.7%", out.stderr), out.stderr
