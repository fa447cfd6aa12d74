"""The Redis tier through live gateways: several gateways share one cache, and a Redis that
goes away never fails a request (INTERFACE.md "Cache", ADR 0003).

Two gateways point at one real ``redis-server`` (the session's ``redis_server`` fixture,
which fails rather than skips when redis-server is missing: scripts/test installs it). Each
gateway has its own ``cache.dir``, so the only thing they share is Redis.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_cache import access_log, backend_calls, chat_body, post
from tests.live.procs import wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("r")


@pytest.fixture(scope="module")
def pair(mock: MockBackend, gateway_module: GatewayFactory, redis_server: RedisServer) -> tuple[Gateway, Gateway]:
    config = {"cache": {"redis_url": redis_server.url}}
    a = gateway_module([mock], config=config)
    b = gateway_module([mock], config=config)
    assert a.config["cache"]["dir"] != b.config["cache"]["dir"]
    return a, b


def test_a_miss_on_one_gateway_is_a_hit_on_the_other(pair: tuple[Gateway, Gateway], mock: MockBackend,
                                                     clean_redis: RedisServer) -> None:
    a, b = pair
    for body in (chat_body(), chat_body(stream=True)):
        before = backend_calls(mock)
        s, h, first = post(a, body)
        assert (s, h["x-cache"]) == (200, "MISS")
        s, h, second = post(b, body)
        assert (s, h["x-cache"]) == (200, "HIT"), "the other gateway did not find it in Redis"
        assert second == first
        assert backend_calls(mock) == before + 1
    # The other way round, and the partition by credential holds across gateways too.
    body = chat_body()
    _, h, first = post(b, body, {"Authorization": "Bearer one"})
    assert h["x-cache"] == "MISS"
    s, h, again = post(a, body, {"Authorization": "Bearer one"})
    assert (h["x-cache"], again) == ("HIT", first)
    assert post(a, body, {"Authorization": "Bearer two"})[1]["x-cache"] == "MISS"
    assert clean_redis.command("DBSIZE").startswith(b":")


class Load:
    """Requests to one gateway in a loop on a thread (each on a fresh connection): every second
    one a new prompt (must reach the backend), the others a repeat (served by the local tiers)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.log: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.repeat = chat_body()

    def __enter__(self) -> Load:
        assert post(self.gw, self.repeat)[0] == 200  # cached before the loop: every repeat is a hit
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        deadline = time.monotonic() + 60  # bounded, whatever the test does
        i = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            new = i % 2 == 0
            body = chat_body() if new else self.repeat
            t = time.monotonic()
            rid = f"load{uuid.uuid4().hex}"
            entry: dict[str, Any] = {"t": t, "new": new, "id": rid}
            try:
                status, headers, _ = post(self.gw, body, {"X-Request-ID": rid}, timeout=5.0)
                entry.update(status=status, cache=headers.get("x-cache"))
            except OSError as exc:
                entry.update(status=0, error=repr(exc))
            entry["latency"] = time.monotonic() - t
            self.log.append(entry)
            i += 1
            time.sleep(0.005)

    def since(self, t: float) -> list[dict[str, Any]]:
        return [e for e in list(self.log) if e["t"] >= t]


def p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def test_redis_outage_fails_no_request_and_sharing_resumes(pair: tuple[Gateway, Gateway], mock: MockBackend,
                                                           clean_redis: RedisServer) -> None:
    a, b = pair
    redis_server = clean_redis
    # Both gateways have talked to Redis before the outage (connections in their pools).
    warm = chat_body()
    post(a, warm)
    assert post(b, warm)[1]["x-cache"] == "HIT"
    calls_before = backend_calls(mock)
    with Load(a) as load:
        wait_until(lambda: len(load.log) >= 40, timeout=10, what="load before the outage")
        before = load.since(0)
        stopped_at = time.monotonic()
        redis_server.stop()
        assert not redis_server.ping()
        wait_until(lambda: len(load.since(stopped_at)) >= 80, timeout=10, what="load during the outage")
        during = load.since(stopped_at)
        # ... and the other gateway keeps serving too.
        outage_b = [post(b, chat_body()) for _ in range(5)]
        restarted_at = time.monotonic()
        redis_server.start()
        wait_until(lambda: len(load.since(restarted_at)) >= 20, timeout=10, what="load after the outage")
    log = load.log
    failures = [e for e in log if e["status"] != 200]
    assert not failures, f"{len(failures)} of {len(log)} requests failed: {failures[:3]}"
    assert [s for s, _, _ in outage_b] == [200] * 5
    # New prompts reach the backend (MISS), repeats are hits from the local tiers.
    assert all(e["cache"] == "MISS" for e in log if e["new"])
    assert all(e["cache"] == "HIT" for e in log if not e["new"])
    assert backend_calls(mock) - calls_before == 1 + sum(e["new"] for e in log) + 5
    # Little added latency: no request waits on the dead Redis.
    lat_before = [e["latency"] for e in before]
    lat_during = [e["latency"] for e in during]
    print(f"latency ms before: p50 {1000 * statistics.median(lat_before):.2f} max {1000 * max(lat_before):.2f}; "
          f"Redis down: p50 {1000 * statistics.median(lat_during):.2f} p99 {1000 * p(lat_during, 0.99):.2f} "
          f"max {1000 * max(lat_during):.2f}")
    # The gateway's own view (access log latency_ms), without the client's noise.
    served = access_log(a, {e["id"] for e in log})
    gw_before = [served[e["id"]]["latency_ms"] for e in before if e["id"] in served]
    gw_during = [served[e["id"]]["latency_ms"] for e in during if e["id"] in served]
    print(f"gateway latency_ms before: p50 {statistics.median(gw_before):.2f} max {max(gw_before):.2f}; "
          f"Redis down: p50 {statistics.median(gw_during):.2f} p99 {p(gw_during, 0.99):.2f} max {max(gw_during):.2f}")
    assert statistics.median(lat_during) < statistics.median(lat_before) + 0.02
    assert max(gw_during) < 200, gw_during
    assert max(lat_during) < 0.5, f"a request took {max(lat_during):.3f}s while Redis was down"
    assert "cache.redis_unavailable" in a.output()

    # Redis is back: after the back-off, a miss on one gateway is a hit on the other again.
    def shared() -> bool:
        body = chat_body()
        assert post(a, body)[0] == 200
        s, h, _ = post(b, body)
        assert s == 200
        return h["x-cache"] == "HIT"

    wait_until(shared, timeout=8, interval=0.2, what="sharing through Redis after its restart")
    recovered_after = time.monotonic() - restarted_at
    print(f"sharing again {recovered_after:.2f}s after Redis restarted")
    assert recovered_after < 5.0
    wait_until(lambda: "cache.redis_recovered" in a.output(), timeout=5, what="the recovery log line")


@pytest.fixture
def slow_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """Redis that accepts connections but answers nothing (SIGSTOP) for the test's duration."""
    redis_server.start()
    redis_server.flush()
    assert redis_server.proc is not None
    redis_server.proc.signal(signal.SIGSTOP)
    try:
        yield redis_server
    finally:
        redis_server.proc.signal(signal.SIGCONT)


def test_a_redis_that_hangs_does_not_stall_requests(pair: tuple[Gateway, Gateway], mock: MockBackend,
                                                    slow_redis: RedisServer) -> None:
    a, _ = pair
    latencies = []
    for _ in range(20):
        t = time.monotonic()
        s, h, _ = post(a, chat_body())
        latencies.append(time.monotonic() - t)
        assert (s, h["x-cache"]) == (200, "MISS")
    # One request pays the 50 ms socket timeout; then the gateway backs off for a second.
    assert max(latencies) < 0.5, latencies
    assert sorted(latencies)[len(latencies) // 2] < 0.05, latencies
