"""Two gateway processes on one redis-server act as one (INTERFACE.md "Several gateways",
ADR 0009): identical requests in flight on both reach the backend once, a leader gateway killed
mid-answer leaves its followers on the other a complete answer or a clean error and nothing
half-stored, and a Redis outage costs no client an error while sharing resumes by itself when
Redis is back. (An answer stored by one gateway is a hit on the other:
tests/integration/test_cache_redis.py.)

Each gateway has its own ``cache.dir`` (its own host coalescer): only Redis joins them. The mock
backend is made slow per request (``X-Mock-TTFT``, ``X-Mock-Token-Delay``; not part of the
cache key) so that the requests overlap.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from tests.integration.test_cache import chat_body, post
from tests.integration.test_cache_redis import Load
from tests.integration.test_coalescing import Call, finish, start_calls
from tests.live.procs import wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]

N = 10
SLOW = {"X-Mock-TTFT": "1.0"}
SLOW_STREAM = {"X-Mock-TTFT": "0.6", "X-Mock-Token-Delay": "0.05", "X-Mock-Tokens": "12"}


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("c")


def two_gateways(factory: GatewayFactory, mock: MockBackend, redis: RedisServer) -> tuple[Gateway, Gateway]:
    config = {"cache": {"redis_url": redis.url}}
    return factory([mock], config=config), factory([mock], config=config)


@pytest.fixture(scope="module")
def pair(mock: MockBackend, gateway_module: GatewayFactory, redis_server: RedisServer) -> tuple[Gateway, Gateway]:
    return two_gateways(gateway_module, mock, redis_server)


@pytest.fixture
def fresh_pair(mock: MockBackend, gateway: GatewayFactory, clean_redis: RedisServer) -> tuple[Gateway, Gateway]:
    """Two gateways of this test's own (the kill test takes one down)."""
    return two_gateways(gateway, mock, clean_redis)


def requests_for(mock: MockBackend) -> int:
    return int(mock.stats()["by_path"].get("/v1/chat/completions", 0))


def split_burst(a: Gateway, b: Gateway, body: dict[str, Any], headers: dict[str, str]) -> list[Call]:
    """N identical requests at once, alternately on a and b."""
    t0 = time.monotonic()
    calls = [Call((a if i % 2 == 0 else b).port, body, headers, t0) for i in range(N)]
    for c in calls:
        c.start()
    return calls


def cluster(gw: Gateway) -> dict[str, Any]:
    figures = gw.metrics()["cluster"]
    assert figures is not None, "no cluster figures in /metrics"
    return figures  # type: ignore[no-any-return]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_identical_requests_split_across_two_gateways_reach_the_backend_once(
        pair: tuple[Gateway, Gateway], mock: MockBackend, clean_redis: RedisServer, stream: bool) -> None:
    a, b = pair
    body = chat_body(stream=True) if stream else chat_body()
    before = requests_for(mock)
    calls = split_burst(a, b, body, SLOW_STREAM if stream else SLOW)
    finish(calls, timeout=20)
    assert [c.error for c in calls if c.error] == []
    assert [c.status for c in calls] == [200] * N
    assert all(c.complete for c in calls)
    assert len({c.body for c in calls}) == 1, "followers got a different answer than the leader"
    if stream:
        assert calls[0].body.endswith(b"data: [DONE]\n\n")
    assert requests_for(mock) - before == 1, "the burst reached the backend more than once"
    assert sorted(c.cache for c in calls) == ["HIT"] * (N - 1) + ["MISS"]
    # Both gateways took part, and one of them followed the other through Redis.
    wait_until(lambda: cluster(a)["flights"].get("followed", 0) + cluster(b)["flights"].get("followed", 0) >= 1,
               timeout=5, what="a cross-gateway follower in /metrics")
    flights = {name: cluster(gw)["flights"] for name, gw in (("a", a), ("b", b))}
    assert sum(f.get("led", 0) for f in flights.values()) >= 1, flights
    assert all(cluster(gw)["redis_available"] for gw in (a, b))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_request_alone_on_its_gateway_leads_the_others_followers_to_the_end(
        pair: tuple[Gateway, Gateway], mock: MockBackend, stream: bool) -> None:
    """The leader is the only request for its key on its own gateway, so its host writes the
    answer to L2 in the loop's next turn (ntonix/gateway/bodies.py): the cluster's flight must
    still end properly for the followers on the other gateway (it ends in the request's
    greenlet: a loop callback may not wait on Redis)."""
    a, b = pair
    body = chat_body(stream=True) if stream else chat_body()
    headers = SLOW_STREAM if stream else SLOW
    before = requests_for(mock)
    led = cluster(a)["flights"].get("led", 0)
    t0 = time.monotonic()
    leader = start_calls(a, 1, body, headers, t0)
    wait_until(lambda: cluster(a)["flights"].get("led", 0) > led, timeout=5, what="a's request leading")
    followers = start_calls(b, 3, body, headers, t0)
    calls = leader + followers
    finish(calls, timeout=20)
    assert [c.error for c in calls if c.error] == []
    assert [(c.status, c.complete) for c in calls] == [(200, True)] * 4
    assert len({c.body for c in calls}) == 1, "followers got a different answer than the leader"
    assert [c.cache for c in calls] == ["MISS", "HIT", "HIT", "HIT"]
    assert requests_for(mock) - before == 1, "the other gateway's requests reached the backend"


def stored_answers(redis: RedisServer) -> int:
    return int(redis.command("EVAL", "return #redis.call('KEYS', 'ntonix:cache:*')", "0")[1:].split(b"\r\n")[0])


def test_prometheus_text_shows_the_cluster(pair: tuple[Gateway, Gateway], clean_redis: RedisServer) -> None:
    a, _ = pair
    post(a, chat_body())
    # The answer reaches Redis with the keeper's next batch (up to tick_s after the client has
    # it): wait, or the next test's emptied Redis could receive it after being emptied.
    wait_until(lambda: stored_answers(clean_redis) >= 1, timeout=5, interval=0.02, what="the answer in Redis")
    status, _, text = a.request("GET", "/metrics?format=prometheus")
    assert status == 200
    assert b'ntonix_cluster_flights_total{outcome="led"}' in text
    assert b"ntonix_cluster_redis_available{redis=" in text


def worker_pid(gw: Gateway) -> int:
    pid = int(gw.metrics()["worker_pid"])
    assert pid != gw.pid
    return pid


@pytest.mark.parametrize("when", ["before-head", "mid-stream"])
def test_a_leader_gateway_killed_mid_answer_leaves_its_followers_an_answer_or_a_clean_error(
        fresh_pair: tuple[Gateway, Gateway], mock: MockBackend, clean_redis: RedisServer, when: str) -> None:
    a, b = fresh_pair
    body = chat_body(stream=True)
    headers = {"X-Mock-TTFT": "1.5" if when == "before-head" else "0.1", "X-Mock-Token-Delay": "0.1",
               "X-Mock-Tokens": "12"}
    victim = worker_pid(a)
    t0 = time.monotonic()
    (leader,) = start_calls(a, 1, body, headers, t0)
    wait_until(lambda: mock.stats()["active_requests"] >= 1, timeout=5, interval=0.01, what="the leader at the backend")
    if when == "mid-stream":
        wait_until(lambda: len(leader.pieces) >= 2, timeout=5, interval=0.01, what="the leader's first events")
    followers = start_calls(b, N - 1, body, headers, t0)
    wait_until(lambda: cluster(b)["flights"].get("followed", 0) >= 1, timeout=5, interval=0.02,
               what="b following a's flight")
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    finish(followers, timeout=20)
    finish([leader], timeout=5)
    late = [round((c.ended_at or 99) + t0 - killed, 2) for c in followers if (c.ended_at or 99) + t0 - killed > 8]
    assert not late, f"answers came more than 8 s after the leader's gateway died: {late}"
    whole = [c for c in followers if c.status == 200 and c.complete]
    broken = [c for c in followers if not (c.status == 200 and c.complete)]
    for c in whole:
        assert c.body.endswith(b"data: [DONE]\n\n"), c.body[-200:]
    for c in broken:  # a clean error: an error status, or a stream cut without its end
        assert c.status in (0, 502, 503, 504) or (c.status == 200 and not c.complete), (c.status, c.error)
        assert b"data: [DONE]" not in c.body
    if when == "before-head":
        # Nothing was sent yet: the followers regroup behind a new leader and all get the answer.
        assert len(whole) == N - 1, [(c.status, c.complete, c.error) for c in followers]
    # Nothing half-stored: whatever is cached for this request now is a whole answer.
    s, h, again = post(b, body)
    assert s == 200 and again.endswith(b"data: [DONE]\n\n")
    if h["x-cache"] == "HIT":
        assert again in {c.body for c in whole}
    assert stored_answers(clean_redis) <= 1
    wait_until(lambda: a.alive() and _serves(a), timeout=30, what="gateway a's new worker")


def _serves(gw: Gateway) -> bool:
    try:
        return post(gw, chat_body(), timeout=2.0)[0] == 200
    except OSError:
        return False


def test_redis_stopped_mid_traffic_costs_no_error_and_sharing_resumes(
        pair: tuple[Gateway, Gateway], mock: MockBackend, clean_redis: RedisServer) -> None:
    a, b = pair
    with Load(a) as load_a, Load(b) as load_b:
        wait_until(lambda: len(load_a.log) >= 20 and len(load_b.log) >= 20, timeout=10, what="load before")
        stopped_at = time.monotonic()
        clean_redis.stop()
        wait_until(lambda: len(load_a.since(stopped_at)) >= 40, timeout=10, what="load during the outage")
        # Local behaviour: a burst split across both reaches the backend once per gateway (each
        # host still coalesces its own requests).
        calls = split_burst(a, b, chat_body(), SLOW)
        finish(calls, timeout=20)
        assert [c.status for c in calls] == [200] * N
        assert sorted(c.cache for c in calls) == ["HIT"] * (N - 2) + ["MISS"] * 2
        restarted_at = time.monotonic()
        clean_redis.start()
        wait_until(lambda: len(load_a.since(restarted_at)) >= 20, timeout=10, what="load after the outage")
    failures = [e for e in load_a.log + load_b.log if e["status"] != 200]
    assert not failures, f"{len(failures)} requests failed: {failures[:3]}"
    assert cluster(a)["flights"].get("redis_errors", 0) + cluster(b)["flights"].get("redis_errors", 0) >= 1

    # Redis back: a burst split across both gateways reaches the backend once again.
    def shared_again() -> bool:
        calls = split_burst(a, b, chat_body(), SLOW)
        finish(calls, timeout=20)
        assert [c.status for c in calls] == [200] * N
        return [c.cache for c in calls].count("MISS") == 1

    wait_until(shared_again, timeout=30, interval=0.2, what="coalescing across gateways after Redis restarted")
    assert all(cluster(gw)["redis_available"] for gw in (a, b))


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[RedisServer]:
    server = RedisServer(tls=trustme.CA())
    yield server
    server.close()


@pytest.mark.parametrize("kind", ["unix", "tls"])
def test_gateways_sharing_redis_through_a_unix_socket_or_tls_act_as_one(
        mock: MockBackend, gateway: GatewayFactory, clean_redis: RedisServer, request: pytest.FixtureRequest,
        kind: str) -> None:
    # unix:// and rediss:// were accepted at start-up, then every new miss was a 500 and an
    # identical request after it waited a minute: the cluster's own client spoke redis:// only.
    url = clean_redis.unix_url if kind == "unix" else request.getfixturevalue("tls_redis").tls_url
    config = {"cache": {"redis_url": url}}
    a, b = gateway([mock], config=config), gateway([mock], config=config)
    before = requests_for(mock)
    calls = split_burst(a, b, chat_body(), SLOW)
    finish(calls, timeout=20)
    assert [c.status for c in calls] == [200] * N
    assert sorted(c.cache for c in calls) == ["HIT"] * (N - 1) + ["MISS"]
    assert requests_for(mock) - before == 1
    body = chat_body()
    assert post(a, body)[0] == 200
    status, headers, _ = post(b, body)
    assert (status, headers.get("x-cache")) == (200, "HIT")
    assert all(cluster(gw)["redis_available"] for gw in (a, b))


def streamed_text(body: bytes) -> str:
    """The text a chat-completion stream carries (its deltas, in order)."""
    text = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def test_streams_followed_across_gateways_survive_redis_dying_mid_answer(
        fresh_pair: tuple[Gateway, Gateway], clean_redis: RedisServer, mock: MockBackend) -> None:
    # INTERFACE.md: Redis down, each gateway goes on alone with no client-visible error. A
    # follower on the other gateway loses its leader's events with Redis; it asks a backend of
    # its own and goes on from where its client is, as the new answer carries the same text
    # (the chunks' ids and timestamps differ: the byte-for-byte check cut every such client).
    a, b = fresh_pair
    slow = {"X-Mock-TTFT": "0.3", "X-Mock-Token-Delay": "0.1", "X-Mock-Tokens": "20"}
    before = requests_for(mock)
    calls = split_burst(a, b, chat_body(stream=True), slow)
    wait_until(lambda: all(b"data: {" in c.body for c in calls), timeout=10, what="every client has events")
    followed = sum(cluster(gw)["flights"].get("followed", 0) for gw in (a, b))
    assert followed >= 1, "no request followed the other gateway's answer"
    assert requests_for(mock) - before == 1
    clean_redis.stop()
    finish(calls, timeout=30)
    assert requests_for(mock) - before > 1, "nobody asked a backend of its own: nothing was resumed"
    assert [c.status for c in calls] == [200] * N
    assert all(c.complete and c.body.rstrip().endswith(b"data: [DONE]") for c in calls), [c.error for c in calls]
    texts = {streamed_text(c.body) for c in calls}
    assert len(texts) == 1 and texts.pop().count("tok") == 20
    clean_redis.start()


def test_after_redis_restarts_sharing_comes_back_and_stays(
        fresh_pair: tuple[Gateway, Gateway], mock: MockBackend, clean_redis: RedisServer) -> None:
    # Connections kept from before the restart each failed when next used, each failure another
    # second alone: sharing came back on and off for minutes. Now the first failure drops them all.
    a, b = fresh_pair
    for _ in range(3):  # several pooled connections per worker
        finish(split_burst(a, b, chat_body(), SLOW), timeout=20)
    clean_redis.stop()
    # Idle gateways see the outage too: every worker pings Redis each second when idle.
    wait_until(lambda: not any(cluster(gw)["redis_available"] for gw in (a, b)), timeout=10,
               what="both idle gateways report Redis unavailable")
    clean_redis.start()
    wait_until(lambda: all(cluster(gw)["redis_available"] for gw in (a, b)), timeout=10,
               what="both idle gateways report Redis back")

    def shared() -> bool:
        calls = split_burst(a, b, chat_body(), SLOW)
        finish(calls, timeout=20)
        assert [c.status for c in calls] == [200] * N
        return [c.cache for c in calls].count("MISS") == 1

    # The pings met the stale connections first (a failure drops them all): from the first
    # burst on, every one reaches the backend once.
    rounds = [shared() for _ in range(4)]
    assert rounds == [True] * 4, rounds
