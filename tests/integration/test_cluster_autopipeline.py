"""The auto-pipelined Redis connection of a gevent worker (ntonix/cluster/resp.py ``AutoPipeline``)
against a real redis-server, with gevent's cooperative sockets as inside a worker.

Each test runs its greenlets in this (unpatched) process: ``resp.socket`` is replaced by
``gevent.socket`` so a wait for Redis yields to the other greenlets, as under monkey-patching.
"""

from __future__ import annotations

import socket as std_socket
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.socket
import pytest

from ntonix.cache.coalescer import Coalescer
from ntonix.cache.coalescer import Leader as HostLeader
from ntonix.cluster import resp
from ntonix.cluster.flights import Flights, Leader
from ntonix.cluster.follower import Follower
from ntonix.cluster.relay import Fanout
from ntonix.cluster.resp import ERRORS, AutoPipeline, Pool, RespError
from tests.live.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]


@pytest.fixture(autouse=True)
def cooperative_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resp, "socket", gevent.socket)


@pytest.fixture
def auto(clean_redis: RedisServer) -> Iterator[AutoPipeline]:
    pipe = AutoPipeline(Pool(clean_redis.url, timeout_s=0.5))
    yield pipe
    pipe.close()
    pipe.pool.close()


def test_the_calls_of_one_turn_share_a_write_and_each_caller_gets_its_own_reply(auto: AutoPipeline) -> None:
    n = 300
    setters = [gevent.spawn(auto.call, "SET", f"k{i}", f"v{i}") for i in range(n)]
    gevent.joinall(setters, timeout=10, raise_error=True)
    assert [g.value for g in setters] == [b"OK"] * n
    writes = auto.batches
    getters = [gevent.spawn(auto.call, "GET", f"k{i}") for i in range(n)]
    gevent.joinall(getters, timeout=10, raise_error=True)
    assert [g.value for g in getters] == [f"v{i}".encode() for i in range(n)]
    # 300 calls started in one turn: a handful of writes, not one each.
    assert auto.batches - writes <= 3, auto.batches - writes


def test_an_error_reply_fails_only_its_own_call(auto: AutoPipeline) -> None:
    calls = [gevent.spawn(auto.call, "SET", "a", "1"), gevent.spawn(auto.call, "NOSUCHCOMMAND", "x"),
             gevent.spawn(auto.call, "GET", "a")]
    gevent.joinall(calls, timeout=10)
    assert calls[0].value == b"OK"
    assert isinstance(calls[1].exception, RespError) and "unknown command" in str(calls[1].exception).lower()
    assert calls[2].value == b"1"
    assert auto.call("PING") == b"PONG"  # the connection stayed in step


def test_a_caller_killed_while_waiting_leaves_the_replies_in_step(auto: AutoPipeline) -> None:
    auto.call("SET", "mine", "yes")
    auto.call("SET", "theirs", "no")
    victim = gevent.spawn(auto.call, "GET", "theirs")
    other = gevent.spawn(auto.call, "GET", "mine")
    gevent.sleep(0)  # both are waiting now, their commands written or queued
    victim.kill()
    other.join(timeout=5)
    assert other.value == b"yes"
    assert auto.call("GET", "mine") == b"yes"


def test_a_silent_redis_fails_every_waiting_call_within_the_timeout_then_a_new_connection_serves() -> None:
    silent = std_socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts (the kernel does), never answers
    port = silent.getsockname()[1]
    pipe = AutoPipeline(Pool(f"redis://127.0.0.1:{port}/0", timeout_s=0.1))
    try:
        calls = [gevent.spawn(pipe.call, "GET", f"k{i}") for i in range(20)]
        gevent.joinall(calls, timeout=5)
        assert all(g.ready() for g in calls)
        assert all(isinstance(g.exception, ERRORS) for g in calls), [g.exception for g in calls]
        assert pipe._line is None  # dropped: the next call opens a new connection
    finally:
        pipe.close()
        silent.close()


def test_redis_restarted_between_calls_costs_one_failed_call_at_most(clean_redis: RedisServer) -> None:
    pipe = AutoPipeline(Pool(clean_redis.url, timeout_s=0.5))
    try:
        assert pipe.call("PING") == b"PONG"
        clean_redis.stop()
        with pytest.raises(ERRORS):
            pipe.call("PING")
        clean_redis.start()
        assert pipe.call("PING") == b"PONG"
    finally:
        pipe.close()


def test_flights_joined_through_the_pipeline_lead_and_follow_as_without(clean_redis: RedisServer) -> None:
    a, b = Flights(clean_redis.url), Flights(clean_redis.url)
    a.auto_pipeline = b.auto_pipeline = True
    try:
        distinct = [gevent.spawn(a.join, f"key-{i}") for i in range(100)]
        gevent.joinall(distinct, timeout=10, raise_error=True)
        assert all(isinstance(g.value, Leader) and g.value.value for g in distinct)
        assert len({g.value.token for g in distinct}) == 100
        same = [gevent.spawn(b.join, f"key-{i}") for i in range(100)]
        gevent.joinall(same, timeout=10, raise_error=True)
        assert all(isinstance(g.value, Follower) for g in same)
        # A handful of writes for 100 joins, not one each (6 were seen once on a loaded CI
        # machine: a new connection's connect yields, and callers queue behind it in turns).
        assert a._auto is not None and a._auto.batches <= 10, a._auto and a._auto.batches
        for g in distinct:
            g.value.finish(False)
        for g in same:
            g.value.close()
    finally:
        a.close()
        b.close()


def test_a_write_bigger_than_the_socket_takes_at_once_is_finished_in_order(auto: AutoPipeline) -> None:
    """20 values of 1 MiB in one turn: the loop's non-blocking send takes part of the 20 MiB, a
    writer greenlet the rest, and the calls queued meanwhile go after it."""
    values = [bytes([i]) * (1 << 20) for i in range(20)]
    setters = [gevent.spawn(auto.call, "SET", f"big{i}", v) for i, v in enumerate(values)]
    gevent.sleep(0)  # the first write is under way: these queue behind it
    more = [gevent.spawn(auto.call, "INCR", "after") for _ in range(10)]
    gevent.joinall(setters + more, timeout=20, raise_error=True)
    assert [g.value for g in setters] == [b"OK"] * 20
    assert sorted(g.value for g in more) == list(range(1, 11))
    getters = [gevent.spawn(auto.call, "GET", f"big{i}") for i in range(20)]
    gevent.joinall(getters, timeout=20, raise_error=True)
    assert [g.value for g in getters] == values


def test_the_reader_leaves_when_idle_and_the_next_call_brings_it_back(clean_redis: RedisServer) -> None:
    pipe = AutoPipeline(Pool(clean_redis.url, timeout_s=0.05))
    try:
        assert pipe.call("SET", "x", "1") == b"OK"
        line = pipe._line
        assert line is not None
        gevent.sleep(0.3)  # several timeouts with nothing due
        assert not line.reading
        assert pipe.call("GET", "x") == b"1"
        assert pipe._line is line  # the same connection, a new reader
    finally:
        pipe.close()


def test_a_host_leader_solo_on_its_board_ends_the_clusters_flight_at_once_and_its_own_after_the_turn(
        clean_redis: RedisServer, tmp_path: Path) -> None:
    """The batched L2 write (ntonix/gateway/bodies.py): the host's flight ends from a loop
    callback, after the write; the cluster's flight ends in the request's greenlet, because its
    end may wait on Redis (here: a follower on another gateway reads it, so the end is a round
    trip of its own), which a loop callback may not do."""
    a = Flights(clean_redis.url, sleep=gevent.sleep, spawn=gevent.spawn)
    b = Flights(clean_redis.url, sleep=gevent.sleep, spawn=gevent.spawn)
    a.auto_pipeline = b.auto_pipeline = True
    host = Coalescer(str(tmp_path), lazy=True)
    try:
        local = host.join("k")
        assert isinstance(local, HostLeader) and local.solo_on_board
        cluster = a.join("k")
        assert isinstance(cluster, Leader) and cluster.value
        fan = Fanout(local, cluster)
        follower = b.join("k")  # another gateway's request for the same answer
        assert isinstance(follower, Follower)
        fan.publish_head(200, (("Content-Type", "application/json"),))
        fan.publish_chunk(b'{"a":')
        deadline = time.monotonic() + 5
        while not cluster.has_followers and time.monotonic() < deadline:
            gevent.sleep(0.02)  # the keeper learns of the follower and sends what it missed
        assert cluster.has_followers
        fan.publish_chunk(b"1}")
        fan.finish_after(True, gevent.get_hub().loop.run_callback)
        assert not local.finished  # the host's flight waits for the loop's turn
        gevent.sleep(0)
        assert follower.wait_head(2) == (200, (("Content-Type", "application/json"),))
        assert b"".join(follower.chunks(2)) == b'{"a":1}'  # the other gateway got it all
        assert local.finished and cluster.finished
    finally:
        a.close()
        b.close()
