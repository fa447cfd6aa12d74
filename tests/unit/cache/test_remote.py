"""RedisStore against a real redis-server (the session ``redis_server`` fixture, loopback)."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from ntonix.cache.remote import PREFIX, RedisStore, _redacted
from ntonix.core.cache_entry import CachedResponse
from tests.fakes import FakeClock
from tests.live.procs import free_port
from tests.live.servers import RedisServer

pytestmark = pytest.mark.redis




def entry(body: bytes = b"hello", created: float | None = None) -> CachedResponse:
    return CachedResponse(200, (("Content-Type", "application/json"),), body,
                          time.time() if created is None else created, False)


def test_two_gateways_share_entries(clean_redis: RedisServer) -> None:
    a, b = RedisStore(clean_redis.url, 60), RedisStore(clean_redis.url, 60)
    e = entry()
    assert a.get("k") is None
    assert a.put("k", e)
    assert b.get("k") == e
    assert b.delete("k") and a.get("k") is None


def test_expiry_is_set_from_the_remaining_lifetime(clean_redis: RedisServer) -> None:
    store = RedisStore(clean_redis.url, 60)
    assert store.put("k", entry(created=time.time() - 50))
    pttl = int(clean_redis.command("PTTL", PREFIX + "k").strip(b":\r\n"))
    assert 9_000 < pttl <= 10_000
    assert not store.put("old", entry(created=time.time() - 61))  # already expired
    assert store.get("old") is None


def test_entry_past_its_ttl_is_a_miss_even_if_redis_still_has_it(clean_redis: RedisServer) -> None:
    wall = FakeClock(time.time())
    store = RedisStore(clean_redis.url, 60, wall_clock=wall)
    store.put("k", entry(created=wall.now))
    wall.advance(61)
    assert store.get("k") is None


def test_garbage_under_the_prefix_is_a_miss(clean_redis: RedisServer) -> None:
    clean_redis.command("SET", PREFIX + "bad", "not an entry")
    assert RedisStore(clean_redis.url, 60).get("bad") is None


def test_purge_removes_only_our_prefix(clean_redis: RedisServer) -> None:
    store = RedisStore(clean_redis.url, 60)
    for i in range(1200):  # more than one SCAN/UNLINK batch
        store.put(f"k{i}", entry())
    clean_redis.command("SET", "someone:else", "x")
    assert store.purge() == 1200
    assert store.get("k1") is None
    assert clean_redis.command("EXISTS", "someone:else").startswith(b":1")


def test_dead_redis_costs_nothing_and_recovers_after_backoff(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    redis_server.start()
    redis_server.flush()
    clock = FakeClock(100.0)
    store = RedisStore(redis_server.url, 60, clock=clock)
    e = entry()
    assert store.put("k", e) and store.get("k") == e

    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGKILL)  # killed mid-test, connections in the pool
    redis_server.stop()
    caplog.set_level(logging.INFO, logger="ntonix.cache")
    started = time.perf_counter()
    assert store.get("k") is None
    assert time.perf_counter() - started < 0.1
    assert not store.available
    # While backing off nothing is even tried: no time, no new log line.
    started = time.perf_counter()
    for _ in range(100):
        assert store.get("k") is None
        assert not store.put("k", e)
        assert store.purge() == 0
    assert time.perf_counter() - started < 0.05
    clock.advance(1.0)
    assert store.get("k") is None  # tried again: still down, still no exception
    warnings = [r for r in caplog.records if r.message == "cache.redis_unavailable"]
    assert len(warnings) == 1  # once per outage

    redis_server.start()
    assert store.get("k") is None  # still backing off
    clock.advance(1.0)
    assert store.put("k", e)
    assert store.get("k") == e
    assert [r.message for r in caplog.records].count("cache.redis_recovered") == 1


def test_unreachable_from_the_start(caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", 60)
    started = time.perf_counter()
    assert store.get("k") is None
    assert not store.put("k", entry())
    assert time.perf_counter() - started < 0.1
    assert "backing-off" in repr(store)


def test_bad_url_is_a_logged_no_op() -> None:
    store = RedisStore("nonsense://", 60)
    assert store.get("k") is None and not store.available


def test_password_is_not_logged() -> None:
    assert _redacted("redis://user:secret@h:6379/0") == "redis://user:***@h:6379/0"
    assert _redacted("redis://:secret@h/0") == "redis://:***@h/0"
    assert _redacted("redis://h:6379") == "redis://h:6379"
