"""With ``routing.policy: prefix`` (``NTONIX_ROUTING_POLICY=prefix``), a conversation whose turns
reach two gateways alternately lands on one backend (INTERFACE.md "Several gateways", ADR 0009):
a new conversation's backend is the rendezvous hash of its first block, the same on every gateway
(ntonix/core/routing.py), and each gateway's index learns the others' assignments in the
background (ntonix/cluster/affinity.py, Runtime.share_routing). The gateways also share their
requests in flight, so that the load bound holds for the cluster as it would for one gateway.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import uuid

import pytest

from tests.integration.test_cache import post
from tests.live.procs import wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackendFactory, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]

TURNS = 8


def conversations_on(a: Gateway, b: Gateway, count: int = 3) -> list[str]:
    """``count`` conversations, their turns sent alternately to ``a`` and ``b``: the backend each
    landed on (all of its turns on one, else the test fails)."""
    landed = []
    for conversation in range(count):
        messages = [{"role": "system", "content": f"conversation {conversation} {uuid.uuid4()} " + "context " * 200}]
        served_by = []
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"turn {turn}"})
            status, _, body = post(a if turn % 2 == 0 else b, {"model": "mock-model", "messages": messages})
            assert status == 200
            answer = json.loads(body)
            served_by.append(answer["id"].split("-")[1])  # chatcmpl-<mock name>-<n>
            messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        assert len(set(served_by)) == 1, f"conversation {conversation}: turns went to {served_by}"
        landed.append(served_by[0])
    return landed


def test_a_conversations_turns_on_two_gateways_land_on_one_backend(
        mock_backend: MockBackendFactory, gateway: GatewayFactory, clean_redis: RedisServer) -> None:
    backends = [mock_backend(f"p{i}") for i in range(3)]
    env = {"NTONIX_ROUTING_POLICY": "prefix"}
    config = {"cache": {"redis_url": clean_redis.url}}
    a = gateway(backends, config=config, env=env)
    b = gateway(backends, config=config, env=env)
    print(f"conversations landed on {conversations_on(a, b)}")


def test_the_prefix_policy_turned_on_by_a_reload_shares_routing_and_turned_off_stops(
        mock_backend: MockBackendFactory, gateway: GatewayFactory, clean_redis: RedisServer) -> None:
    """INTERFACE.md: every routing key can change on HUP. Two gateways started with round-robin
    begin to share prefix assignments and load once a reload makes the policy ``prefix``, and
    stop when another makes it round-robin again."""
    backends = [mock_backend(f"h{i}") for i in range(3)]
    config = {"cache": {"redis_url": clean_redis.url}}
    pair = (gateway(backends, config=config), gateway(backends, config=config))
    assert all(gw.metrics()["cluster"].get("affinity") in (None, {}) for gw in pair)
    for gw in pair:
        gw.write_config({"routing": {"policy": "prefix"}})
        gw.reload()
    for gw in pair:
        wait_until(lambda gw=gw: (gw.metrics()["cluster"].get("affinity") or {}).get("load_syncs", 0) >= 2,
                   timeout=15, interval=0.1, what=f"{gw.port} sharing its routing after the reload")
    conversations_on(*pair)
    for gw in pair:
        gw.write_config({"routing": {"policy": "round_robin"}})
        gw.reload()

    def syncing() -> bool:
        before = [load_syncs(gw) for gw in pair]
        time.sleep(0.5)  # ten sync intervals (AFFINITY_SYNC_S): a running sync counts more
        return [load_syncs(gw) for gw in pair] != before

    wait_until(lambda: not syncing(), timeout=15, interval=0.1, what="the sync stopped after the reload back")
    assert not syncing()


class Stream:
    """A streamed request held open: the backend that serves it is in its first event's id."""

    def __init__(self, gw: Gateway) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        body = {"model": "mock-model", "stream": True, "max_tokens": 400,
                "messages": [{"role": "user", "content": f"{uuid.uuid4()} " + "context " * 80}]}
        self.conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        assert resp.status == 200, resp.read()[:300]
        while not (line := resp.readline()).startswith(b"data: "):
            assert line, "the stream ended before its first event"
        self.backend = json.loads(line[6:])["id"].split("-")[1]  # chatcmpl-<mock name>-<n>

    def close(self) -> None:
        self.conn.close()


def in_flight(gw: Gateway, address: str) -> int:
    return int(next(b["in_flight"] for b in gw.metrics()["backends"] if b["address"] == address))


def load_syncs(gw: Gateway) -> int:
    return int(gw.metrics()["cluster"]["affinity"].get("load_syncs", 0))


def test_a_gateway_weighs_the_load_another_gateway_puts_on_a_backend(
        mock_backend: MockBackendFactory, gateway: GatewayFactory, clean_redis: RedisServer) -> None:
    """A new conversation goes to the least loaded backend, counted over all gateways
    (ntonix/core/routing.py; ntonix/cluster/affinity.py, "Load"). Gateway a, whose only backend
    is x, holds 3 streams there; gateway b (x and y) then sends its next two new conversations
    to y. Counting only its own requests it would see both idle and send one of them to x."""
    x, y = (mock_backend(f"q{i}", token_delay=0.1) for i in range(2))
    env = {"NTONIX_ROUTING_POLICY": "prefix"}
    config = {"cache": {"redis_url": clean_redis.url, "enabled": False}}
    a = gateway([x], config=config, env=env)
    b = gateway([x, y], config=config, env=env)
    held: list[Stream] = []
    try:
        held += [Stream(a) for _ in range(3)]
        assert {s.backend for s in held} == {x.name}
        since = load_syncs(b)
        wait_until(lambda: load_syncs(b) >= since + 3, timeout=10, interval=0.05, what="b hearing a's load")
        mine = [Stream(b) for _ in range(2)]
        held += mine
        assert [s.backend for s in mine] == [y.name, y.name], "b did not weigh a's load on x"
        assert in_flight(a, x.address) == 3
    finally:
        for s in held:
            s.close()


def affinity(gw: Gateway, name: str) -> int:
    return int(gw.metrics()["cluster"]["affinity"].get(name, 0))


def test_an_idle_gateway_does_not_divert_a_conversation_for_a_burst_that_is_over(
        mock_backend: MockBackendFactory, gateway: GatewayFactory, clean_redis: RedisServer) -> None:
    """Gateway b idles, its view of a's load from a's burst on x; the burst ends; the
    conversation pinned to x comes to b right after: it goes to x. b read the others' load up to
    a second late when idle, saw x still busy and sent the turn to y (an outside audit: turns
    0.05-0.3 s after a burst went elsewhere, the conversation's KV cache split)."""
    x, y = mock_backend("r0", token_delay=0.1), mock_backend("r1", token_delay=0.1)
    env = {"NTONIX_ROUTING_POLICY": "prefix"}
    config = {"cache": {"redis_url": clean_redis.url, "enabled": False}}
    a = gateway([x], config=config, env=env)
    b = gateway([x, y], config=config, env=env)
    messages = [{"role": "system", "content": f"{uuid.uuid4()} " + "context " * 200},
                {"role": "user", "content": "turn 0"}]
    merged = affinity(b, "merged")
    status, _, body = post(a, {"model": "mock-model", "messages": messages})  # a knows only x
    assert status == 200
    answer = json.loads(body)
    assert answer["id"].split("-")[1] == x.name
    messages += [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "turn 1"}]
    wait_until(lambda: affinity(b, "merged") > merged, timeout=10, interval=0.05, what="b learning the conversation")
    burst = [Stream(a) for _ in range(5)]
    try:
        since = load_syncs(b)
        wait_until(lambda: load_syncs(b) > since, timeout=10, interval=0.05, what="b reading a's burst")
    finally:
        for s in burst:
            s.close()
    wait_until(lambda: in_flight(a, x.address) == 0, timeout=10, interval=0.02, what="a's burst over")

    def a_published_its_end() -> bool:  # within a sync tick (50 ms) of its end: the sharing's own delay
        raw = clean_redis.command("HGETALL", "ntonix:load")
        counts = re.findall(rb'"' + re.escape(x.address.encode()) + rb'":(\d+)', raw)
        return all(int(n) == 0 for n in counts)

    wait_until(a_published_its_end, timeout=5, interval=0.01, what="a's end of the burst in Redis")
    # b skips the read when it read within the last tick (50 ms): past that, whatever view it has
    # was read after a's end was published.
    time.sleep(0.06)
    status, _, body = post(b, {"model": "mock-model", "messages": messages})
    assert status == 200
    assert json.loads(body)["id"].split("-")[1] == x.name, "b sent the conversation away from its idle backend"
    # With the cache off, Redis serves the routing alone: its availability figure still follows it.
    assert b.metrics()["cluster"]["redis_available"] is True
    clean_redis.stop()
    try:
        wait_until(lambda: b.metrics()["cluster"]["redis_available"] is False, timeout=10, interval=0.1,
                   what="b reporting Redis unavailable")
    finally:
        clean_redis.start()
