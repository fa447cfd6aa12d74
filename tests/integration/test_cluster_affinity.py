"""The shared view of prefix affinity (ntonix/cluster/affinity.py, ADR 0009) on a real redis-server:
two boards stand for two gateways."""

from __future__ import annotations

import threading
import time

import pytest

from ntonix.cluster.affinity import AffinityBoard, Assignment
from tests.live.procs import free_port, wait_until
from tests.live.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]


def test_each_gateway_learns_the_others_assignments_and_not_its_own(clean_redis: RedisServer) -> None:
    a, b = AffinityBoard(clean_redis.url), AffinityBoard(clean_redis.url)
    try:
        a.record("m1", "h1", "10.0.0.1:8000")
        a.record("m1", "h2", "10.0.0.2:8000")
        b.record("m2", "h9", "10.0.0.3:8000")
        assert a.sync() == []  # publishes; nothing from b yet
        assert b.sync() == [Assignment("m1", "h1", "10.0.0.1:8000"), Assignment("m1", "h2", "10.0.0.2:8000")]
        assert a.sync() == [Assignment("m2", "h9", "10.0.0.3:8000")]
        assert a.sync() == [] and b.sync() == []  # each entry once
        assert not a.pending and not b.pending
        # A gateway that starts later reads the recent history.
        c = AffinityBoard(clean_redis.url)
        assert len(c.sync()) == 3
        c.close()
    finally:
        a.close()
        b.close()


def test_the_stream_and_the_batch_stay_bounded(clean_redis: RedisServer) -> None:
    a = AffinityBoard(clean_redis.url, max_pending=5, max_entries=100)
    try:
        for i in range(12):
            a.record("m", f"h{i}", "b:1")
        assert [x.block for x in a.pending] == [f"h{i}" for i in range(7, 12)]  # the newest kept
        for _ in range(300):
            a.record("m", "h", "b:1")
            a.sync()
        assert int(clean_redis.command("XLEN", "ntonix:affinity")[1:].split(b"\r\n")[0]) < 200
        assert int(clean_redis.command("PTTL", "ntonix:affinity")[1:].split(b"\r\n")[0]) > 0
    finally:
        a.close()


def test_redis_down_keeps_the_batch_and_recovers(clean_redis: RedisServer) -> None:
    a = AffinityBoard(clean_redis.url, backoff_s=0.2)
    b = AffinityBoard(clean_redis.url, backoff_s=0.2)
    try:
        a.sync()
        b.sync()
        clean_redis.stop()
        a.record("m", "h1", "b:1")
        t = time.perf_counter()
        assert a.sync() == [] and a.sync() == []  # no exception; the second call does no I/O
        assert time.perf_counter() - t < 0.5
        assert list(a.pending) == [Assignment("m", "h1", "b:1")]
        clean_redis.start()
        wait_until(lambda: a.sync() == [] and not a.pending, timeout=5, what="a published again")
        got = wait_until(lambda: b.sync(), timeout=5, what="b learns it")
        assert got == [Assignment("m", "h1", "b:1")]
    finally:
        a.close()
        b.close()


def test_an_unreachable_redis_is_no_error() -> None:
    a = AffinityBoard(f"redis://127.0.0.1:{free_port()}/0", backoff_s=30)
    a.record("m", "h", "b:1")
    assert a.sync() == [] and a.sync() == []
    assert a.stats["redis_errors"] == 1 and "backing-off" in repr(a)


def test_the_background_loop_merges_into_the_local_index(clean_redis: RedisServer) -> None:
    a, b = AffinityBoard(clean_redis.url), AffinityBoard(clean_redis.url)
    index: dict[tuple[str, str], str] = {}
    stop = threading.Event()

    def merge(got: list[Assignment]) -> None:
        index.update({(x.model, x.block): x.backend for x in got})

    t = threading.Thread(target=b.run, args=(merge, 0.02, time.sleep, stop.is_set), daemon=True)
    t.start()
    try:
        a.record("m", "conversation-1", "10.0.0.7:8000")
        a.sync()
        wait_until(lambda: index.get(("m", "conversation-1")) == "10.0.0.7:8000", timeout=5, what="merged")
    finally:
        stop.set()
        t.join(5)
        a.close()
        b.close()
