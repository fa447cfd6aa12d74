"""Cross-gateway coalescing (ntonix/cluster/flights.py, ADR 0009) against a real redis-server.

Two :class:`Flights` instances in one process stand for two gateways (each has its own
process identity and clients); threads play their requests. The multi-process tests run the
leader in a child process (tests/integration/cluster_peer.py) so that SIGKILL is real.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ntonix.cache.coalescer import LeaderFailed
from ntonix.cluster.flights import Flights, Leader
from ntonix.cluster.follower import Follower
from tests.live.procs import Proc, free_port, wait_until
from tests.live.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]

HEAD = (200, (("Content-Type", "text/event-stream"),))
EVENTS = [f"data: {{\"i\": {i}}}\n\n".encode() for i in range(20)] + [b"data: [DONE]\n\n"]


@pytest.fixture
def gateways(clean_redis: RedisServer) -> Iterator[tuple[Flights, Flights]]:
    made = [Flights(clean_redis.url, spawn=_thread) for _ in range(2)]
    yield made[0], made[1]
    for f in made:
        f.close()


def _thread(fn: object) -> None:
    assert callable(fn)
    threading.Thread(target=fn, daemon=True).start()


def lead(f: Flights, key: str) -> Leader:
    role = f.join(key)
    assert isinstance(role, Leader) and role.value is not None, role
    return role


def follow(f: Flights, key: str) -> Follower:
    role = f.join(key)
    assert isinstance(role, Follower), role
    return role


def stream_answer(leader: Leader, events: list[bytes], delay: float, ok: bool = True) -> None:
    leader.publish_head(*HEAD)
    for e in events:
        time.sleep(delay)
        leader.publish_chunk(e)
    leader.finish(ok)


def flight_keys(redis_server: RedisServer) -> list[bytes]:
    raw = redis_server.command("KEYS", "ntonix:flight:[kfs]:*")
    return [line for line in raw.split(b"\r\n") if line.startswith(b"ntonix:")]


def test_a_follower_on_another_gateway_gets_the_stream_event_by_event(gateways: tuple[Flights, Flights]) -> None:
    a, b = gateways
    leader = lead(a, "k1")
    follower = follow(b, "k1")
    seen: list[tuple[float, bytes]] = []
    sent: list[float] = []

    def publish() -> None:
        leader.publish_head(*HEAD)
        for e in EVENTS:
            time.sleep(0.03)
            sent.append(time.monotonic())
            leader.publish_chunk(e)
        leader.finish(True)

    t = threading.Thread(target=publish)
    t.start()
    assert follower.wait_head(5) == HEAD
    for chunk in follower.chunks(5):
        seen.append((time.monotonic(), chunk))
    t.join(5)
    follower.close()
    assert [c for _, c in seen] == EVENTS
    # As it streams: the last event arrived long after the first (not all at once at the end).
    assert seen[-1][0] - seen[0][0] > 0.3
    assert leader.has_followers is False and a.stats["led"] == 1 and b.stats["followed"] == 1


def test_a_late_joiner_gets_everything_from_the_start(gateways: tuple[Flights, Flights]) -> None:
    a, b = gateways
    leader = lead(a, "late")
    leader.publish_head(*HEAD)
    for e in EVENTS[:5]:
        leader.publish_chunk(e)
    follower = follow(b, "late")
    wait_until(lambda: leader.followers_seen, timeout=5, what="the keeper saw the follower")
    for e in EVENTS[5:]:
        leader.publish_chunk(e)
    leader.finish(True)
    assert follower.wait_head(5) == HEAD
    assert list(follower.chunks(5)) == EVENTS


def test_an_answer_finished_before_the_leader_noticed_its_follower_is_published_whole(
        clean_redis: RedisServer) -> None:
    # No keeper and a long tick: the leader learns of the follower only in finish().
    a, b = Flights(clean_redis.url, tick_s=60), Flights(clean_redis.url, tick_s=60)
    try:
        leader = lead(a, "whole")
        follower = follow(b, "whole")
        leader.publish_head(200, (("Content-Type", "application/json"),))
        leader.publish_chunk(b'{"a": 1}')
        assert not leader.has_followers
        leader.finish(True)
        assert follower.wait_head(2) == (200, (("Content-Type", "application/json"),))
        assert list(follower.chunks(2)) == [b'{"a": 1}']
    finally:
        a.close()
        b.close()


def test_a_miss_nobody_follows_leaves_nothing_behind(gateways: tuple[Flights, Flights],
                                                     clean_redis: RedisServer) -> None:
    a, _ = gateways
    leader = lead(a, "solo")
    stream_answer(leader, EVENTS, 0)
    # The finish goes with the keeper's next batch (one round trip for many misses).
    wait_until(lambda: flight_keys(clean_redis) == [], timeout=5, what="the flight's keys deleted")
    assert a.stats["batched_finishes"] == 1
    # And the key is free again: the next request leads.
    lead(a, "solo").finish(False)


def test_a_request_joining_while_the_finish_is_queued_still_gets_the_whole_answer(clean_redis: RedisServer) -> None:
    a = Flights(clean_redis.url, spawn=lambda fn: None)  # a keeper that never runs: flush() by hand
    b = Flights(clean_redis.url)
    try:
        leader = lead(a, "queued")
        stream_answer(leader, EVENTS[:3], 0)
        follower = follow(b, "queued")  # the flight's key is still there until the batch goes
        a.flush()
        assert follower.wait_head(2) == HEAD
        assert list(follower.chunks(2)) == EVENTS[:3]
    finally:
        a.close()
        b.close()


def test_the_answer_for_the_cache_tier_goes_with_the_flights_end_and_never_after_it(clean_redis: RedisServer) -> None:
    """A leader's answer for the Redis cache tier is sent before its flight's end, in the same
    batch: a gateway asking in between finds the flight (and follows it) or the answer."""
    a = Flights(clean_redis.url, spawn=lambda fn: None)  # a keeper that never runs: flush() by hand
    b = Flights(clean_redis.url)
    try:
        leader = lead(a, "k1")
        stream_answer(leader, EVENTS[:2], 0)  # finished: queued for the batch
        assert leader.store_at_end("ntonix:cache:k1", b"entry one", 60_000) is False  # too late
        leader = lead(a, "k2")
        assert leader.store_at_end("ntonix:cache:k2", b"entry two", 60_000) is True
        stream_answer(leader, EVENTS[:2], 0)
        assert clean_redis.command("GET", "ntonix:cache:k2") == b"$-1\r\n"  # not before the batch
        assert isinstance(b.join_or_hit("k2", "ntonix:cache:k2"), Follower)  # the flight, meanwhile
        a.flush()
        assert b.join_or_hit("k2", "ntonix:cache:k2") == b"entry two"
        assert 0 < int(clean_redis.command("PTTL", "ntonix:cache:k2")[1:]) <= 60_000
        # With a follower known (journaling), the finish is immediate: the SET goes first.
        leader = lead(a, "k3")
        leader.publish_head(*HEAD)
        follower = follow(b, "k3")
        a.tick()
        leader.catch_up()
        assert leader.store_at_end("ntonix:cache:k3", b"entry three", 60_000)
        batched = a.stats["batched_finishes"]
        leader.finish(True)
        assert a.stats["batched_finishes"] == batched and a._pending == []  # not queued: sent now
        assert b"entry three" in clean_redis.command("GET", "ntonix:cache:k3")
        assert follower.wait_head(2) == HEAD
        # A leader without a flight (Redis down: alone) leaves the store to the caller.
        alone = Flights("redis://127.0.0.1:9/0")
        lone = alone.join("k4")
        assert lone.value is None and lone.store_at_end("ntonix:cache:k4", b"x", 60_000) is False
        alone.close()
    finally:
        a.close()
        b.close()


def test_a_cooperative_leader_takes_a_lock_only_once_followed(clean_redis: RedisServer) -> None:
    """In a gevent worker (cooperative), a leader nobody follows only holds its records in
    memory: it makes no lock. Once the keeper sees a follower, catch-up and publishes lock."""
    made: list[object] = []

    def lock() -> threading.RLock:
        made.append(threading.RLock())
        return made[-1]  # type: ignore[return-value]

    a = Flights(clean_redis.url, spawn=lambda fn: None, lock=lock)  # keeper's work by hand
    a.cooperative = True
    b = Flights(clean_redis.url)
    try:
        solo = lead(a, "solo")
        solo.publish_head(*HEAD)
        solo.publish_chunk(EVENTS[0])
        assert solo.store_at_end("ntonix:cache:solo", b"entry", 60_000)
        solo.finish(True)
        a.flush()
        assert made == [] and flight_keys(clean_redis) == []
        assert b.join_or_hit("solo", "ntonix:cache:solo") == b"entry"

        leader = lead(a, "followed")
        leader.publish_head(*HEAD)
        for e in EVENTS[:5]:
            leader.publish_chunk(e)
        follower = follow(b, "followed")
        assert [ld.key for ld in a.tick()] == ["followed"]
        leader.catch_up()
        assert len(made) == 1 and leader.has_followers
        for e in EVENTS[5:]:
            leader.publish_chunk(e)
        leader.finish(True)
        assert len(made) == 1
        assert follower.wait_head(2) == HEAD
        assert list(follower.chunks(2)) == EVENTS
    finally:
        a.close()
        b.close()


def test_an_answer_redis_refuses_to_store_still_ends_its_flight(clean_redis: RedisServer) -> None:
    """The answer's SET runs inside the finish script: refused (Redis at maxmemory), the
    answer stays unshared but the flight still ends, so the next request leads a new one."""
    a = Flights(clean_redis.url, spawn=lambda fn: None)  # a keeper that never runs: flush() by hand
    try:
        leader = lead(a, "full")
        assert leader.store_at_end("ntonix:cache:full", b"x" * 10_000, 60_000)
        stream_answer(leader, EVENTS[:2], 0)
        clean_redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        clean_redis.command("CONFIG", "SET", "maxmemory", "1")
        try:
            a.flush()
        finally:
            clean_redis.command("CONFIG", "SET", "maxmemory", "0")
        assert a.stats["redis_errors"] == 0 and a.stats["batched_finishes"] == 1
        assert clean_redis.command("GET", "ntonix:cache:full") == b"$-1\r\n"  # not stored
        assert flight_keys(clean_redis) == []  # but ended
        lead(a, "full").finish(False)
    finally:
        a.close()


def test_the_cache_recheck_and_the_join_are_one_round_trip(gateways: tuple[Flights, Flights],
                                                             clean_redis: RedisServer) -> None:
    a, b = gateways
    clean_redis.command("SET", "ntonix:cache:stored", "the entry")
    assert a.join_or_hit("stored", "ntonix:cache:stored") == b"the entry"
    assert flight_keys(clean_redis) == []  # a hit joins nothing
    leader = a.join_or_hit("fresh", "ntonix:cache:fresh")
    assert isinstance(leader, Leader) and leader.value is not None
    assert isinstance(b.join_or_hit("fresh", "ntonix:cache:fresh"), Follower)
    clean_redis.command("SET", "ntonix:cache:fresh", "stored meanwhile")
    assert b.join_or_hit("fresh", "ntonix:cache:fresh") == b"stored meanwhile"  # the answer beats the flight
    leader.finish(False)
    assert a.stats["hits"] == 1 and b.stats["hits"] == 1


def test_a_failed_leader_fails_its_followers_cleanly(gateways: tuple[Flights, Flights]) -> None:
    a, b = gateways
    leader = lead(a, "f2")
    waiting = follow(b, "f2")
    leader.finish(False)
    assert waiting.wait_head(2) is None  # never answered: the follower goes alone
    leader = lead(a, "f3")
    midway = follow(b, "f3")
    leader.publish_head(*HEAD)
    leader.publish_chunk(EVENTS[0])
    assert midway.wait_head(2) == HEAD
    leader.finish(False)
    got: list[bytes] = []
    with pytest.raises(LeaderFailed):
        for chunk in midway.chunks(2):
            got.append(chunk)
    assert got == [EVENTS[0]]


def test_an_error_answer_is_shared_with_followers_but_not_with_later_requests(
        gateways: tuple[Flights, Flights]) -> None:
    a, b = gateways
    leader = lead(a, "err")
    follower = follow(b, "err")
    wait_until(lambda: leader.followers_seen, timeout=5, what="the keeper saw the follower")
    leader.publish_head(503, (("Content-Type", "application/json"),))
    later = b.join("err")
    assert isinstance(later, Leader) and later.value is not None, "a later request followed an error answer"
    later.finish(False)
    leader.publish_chunk(b'{"error": {}}')
    leader.finish(True)
    assert follower.wait_head(2) == (503, (("Content-Type", "application/json"),))
    assert list(follower.chunks(2)) == [b'{"error": {}}']


def test_an_answer_too_big_to_hold_is_never_handed_over_truncated(clean_redis: RedisServer) -> None:
    a = Flights(clean_redis.url, max_bytes=1000, tick_s=60)
    b = Flights(clean_redis.url, tick_s=60)
    try:
        leader = lead(a, "big")
        follower = follow(b, "big")
        leader.publish_head(*HEAD)
        for _ in range(5):
            leader.publish_chunk(b"x" * 400)  # past max_bytes before any follower was seen
        later = b.join("big")
        assert isinstance(later, Leader) and later.value is not None  # detached: no new followers
        later.finish(False)
        leader.finish(True)
        assert follower.wait_head(2) is None
    finally:
        a.close()
        b.close()


def test_followers_already_reading_get_a_big_answer_whole_up_to_the_hard_bound(
        gateways: tuple[Flights, Flights], clean_redis: RedisServer) -> None:
    a = Flights(clean_redis.url, max_bytes=1000, spawn=_thread)
    b = gateways[1]
    try:
        leader = lead(a, "huge")
        follower = follow(b, "huge")
        wait_until(lambda: leader.followers_seen, timeout=5, what="the keeper saw the follower")
        leader.publish_head(*HEAD)
        for _ in range(6):
            leader.publish_chunk(b"y" * 500)  # 3000 bytes: past max_bytes, within 4x
        assert isinstance(b.join("huge"), Leader)  # detached
        leader.finish(True)
        assert follower.wait_head(2) == HEAD
        assert b"".join(follower.chunks(2)) == b"y" * 3000
        leader = lead(a, "huger")
        follower = follow(b, "huger")
        wait_until(lambda: leader.followers_seen, timeout=5, what="the keeper saw the follower")
        leader.publish_head(*HEAD)
        for _ in range(12):
            leader.publish_chunk(b"z" * 500)  # past 4x: the followers get a clean failure
        leader.finish(True)
        assert follower.wait_head(2) == HEAD
        with pytest.raises(LeaderFailed):
            list(follower.chunks(2))
    finally:
        a.close()


def test_a_leader_whose_gateway_stops_renewing_is_noticed_and_followers_regroup(clean_redis: RedisServer) -> None:
    a = Flights(clean_redis.url, lease_s=0.3, tick_s=60)  # no keeper, never publishes: a frozen gateway
    b = Flights(clean_redis.url, lease_s=0.3, spawn=_thread)
    try:
        lead(a, "frozen")
        follower = follow(b, "frozen")
        t = time.monotonic()
        assert follower.wait_head(10) is None
        assert time.monotonic() - t < 2.0, "the dead leader was noticed too late"
        follower.close()
        lead(b, "frozen").finish(False)  # regroup: b now leads
    finally:
        a.close()
        b.close()


def test_redis_down_means_every_gateway_goes_alone_without_errors(clean_redis: RedisServer) -> None:
    a = Flights(clean_redis.url, backoff_s=0.5, spawn=_thread)
    b = Flights(clean_redis.url, backoff_s=0.5, spawn=_thread)
    try:
        leader = lead(a, "down")
        follower = follow(b, "down")
        wait_until(lambda: leader.followers_seen, timeout=5, what="the keeper saw the follower")
        leader.publish_head(*HEAD)
        leader.publish_chunk(EVENTS[0])
        assert follower.wait_head(2) == HEAD
        clean_redis.stop()
        # Mid-flight: the leader keeps serving its own client, the follower fails cleanly.
        leader.publish_chunk(EVENTS[1])
        leader.publish_chunk(EVENTS[2])
        leader.finish(True)
        with pytest.raises(LeaderFailed):
            list(follower.chunks(5))
        follower.close()
        # Alone, at once, and without a network attempt during the back-off.
        t = time.perf_counter()
        for _ in range(50):
            role = b.join("down2")
            assert isinstance(role, Leader) and role.value is None
            role.publish_head(*HEAD)
            role.publish_chunk(b"x")
            role.finish(True)
        assert time.perf_counter() - t < 0.5
        assert b.stats["alone"] >= 50 and not b.available
        clean_redis.start()
        leader = wait_until(lambda: lead_or_none(a, "back"), timeout=5, what="a leads through Redis again")
        follower = wait_until(lambda: _follower_or_none(b, "back"), timeout=5, what="b follows again")
        leader.finish(False)
        assert follower.wait_head(2) is None
    finally:
        a.close()
        b.close()


def lead_or_none(f: Flights, key: str) -> Leader | None:
    role = f.join(key)
    if isinstance(role, Leader) and role.value is not None:
        return role
    if isinstance(role, Leader):
        role.finish(False)
    else:
        role.close()
    return None


def test_a_flight_whose_end_was_lost_in_an_outage_never_holds_requests_back(clean_redis: RedisServer) -> None:
    a = Flights(clean_redis.url, lease_s=0.3, backoff_s=0.2, spawn=lambda fn: None)  # flush() by hand
    b = Flights(clean_redis.url, lease_s=0.3)
    try:
        stream_answer(lead(a, "lost"), EVENTS[:2], 0)  # its finish is queued...
        clean_redis.command("CLIENT", "PAUSE", "400", "ALL")
        a.flush()  # ...and times out: the flight's key stays in Redis, naming a
        assert a.stats["redis_errors"] == 1
        wait_until(lambda: a.available and lead_or_none(a, "other") is not None, timeout=5,
                   what="a leads again (and renews its liveness)")
        # The stale key names a's old identity, which nobody renews: b leads within the lease.
        role = wait_until(lambda: lead_or_none(b, "lost"), timeout=3, what="b leads the lost key")
        role.finish(False)
    finally:
        a.close()
        b.close()


def test_an_idle_process_pings_so_its_availability_follows_redis(clean_redis: RedisServer) -> None:
    now = [0.0]
    f = Flights(clean_redis.url, backoff_s=0.5, clock=lambda: now[0])
    try:
        f.probe()
        assert f.reachable and f.stats["redis_errors"] == 0
        clean_redis.stop()
        f.probe()  # within a second of the last ping: nothing sent, nothing known yet
        assert f.reachable
        now[0] += 1.0
        f.probe()
        assert not f.reachable and f.stats["redis_errors"] == 1
        now[0] += 1.0  # past the back-off, still down: still not reachable
        f.probe()
        assert not f.reachable and f.stats["redis_errors"] == 2
        clean_redis.start()
        now[0] += 1.0
        f.probe()  # the failure dropped the dead connections: this ping goes through
        assert f.reachable and f.stats["redis_errors"] == 2
        leader = lead(f, "after")  # and so does the first request after the restart
        pings = pings_seen(clean_redis)
        now[0] += 1.0
        f.probe()  # leading: the request's own commands tell, no ping
        assert pings_seen(clean_redis) == pings
        leader.finish(False)
        assert f.reachable and f.stats["redis_errors"] == 2
        f.probe()
        assert pings_seen(clean_redis) == pings + 1
    finally:
        f.close()


def test_a_quick_redis_restart_costs_the_ping_not_the_next_request(clean_redis: RedisServer) -> None:
    # The connections the joins use go stale in a restart. A ping through redis-py's own client
    # reconnected quietly and saw nothing; the first join after it then went alone.
    now = [0.0]
    f = Flights(clean_redis.url, backoff_s=0.5, clock=lambda: now[0])
    try:
        lead(f, "before").finish(False)  # a pooled connection, now idle
        clean_redis.stop()
        clean_redis.start()
        now[0] += 1.0
        f.probe()
        assert not f.reachable and f.stats["redis_errors"] == 1
        now[0] += 1.0
        f.probe()
        assert f.reachable
        lead(f, "after").finish(False)  # through Redis, not alone
        assert f.stats["redis_errors"] == 1 and f.stats["alone"] == 0
    finally:
        f.close()


def pings_seen(redis_server: RedisServer) -> int:
    """PING commands the server has run (INFO commandstats)."""
    stats = redis_server.command("INFO", "commandstats").decode()
    line = next((x for x in stats.splitlines() if x.startswith("cmdstat_ping:")), "cmdstat_ping:calls=0,")
    return int(line.split("calls=")[1].split(",")[0])


def test_an_unreachable_redis_costs_one_timeout_then_nothing() -> None:
    f = Flights(f"redis://127.0.0.1:{free_port()}/0", backoff_s=30)
    t = time.perf_counter()
    first = f.join("x")
    assert isinstance(first, Leader) and first.value is None
    for _ in range(100):
        assert isinstance(f.join("x"), Leader)
    assert time.perf_counter() - t < 0.5
    assert f.stats["redis_errors"] == 1 and f.stats["alone"] == 101
    assert "backing-off" in repr(f)


# ------------------------------------------------------------------ several processes

def peer(redis_server: RedisServer, *args: str) -> Proc:
    return Proc([sys.executable, "-m", "tests.integration.cluster_peer", redis_server.url, *args], name="peer")


@contextmanager
def peer_leading(redis_server: RedisServer, key: str, events: int,
                 *mode: str) -> Iterator[tuple[Proc, Follower, Flights]]:
    """A peer process leading ``key`` (``events`` events 20 ms apart), followed from here."""
    b = Flights(redis_server.url, spawn=_thread)
    proc = peer(redis_server, key, str(events), "0.02", "wait-follower", *mode)
    try:
        wait_until(lambda: "LEADING" in proc.output(), timeout=10, what="the peer leads")
        follower = follow(b, key)
        assert follower.wait_head(10) == HEAD
        yield proc, follower, b
    finally:
        proc.stop()
        b.close()


@pytest.mark.parametrize("mode", ["threads", "gevent"])
def test_a_leader_in_another_process_streams_to_followers_byte_identical(clean_redis: RedisServer, mode: str) -> None:
    with peer_leading(clean_redis, f"mp-{mode}", 30, mode) as (proc, follower, _):
        chunks = list(follower.chunks(10))
        assert chunks == [f"data: {{\"n\": {i}}}\n\n".encode() for i in range(30)] + [b"data: [DONE]\n\n"]
        assert proc.wait(10) == 0


def test_a_leader_killed_mid_answer_never_yields_a_truncated_complete_answer(clean_redis: RedisServer) -> None:
    with peer_leading(clean_redis, "kill", 1000) as (proc, follower, b):
        chunks = follower.chunks(10)
        got = [next(chunks) for _ in range(5)]
        proc.signal(signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(LeaderFailed):
            for c in chunks:
                got.append(c)
        assert time.monotonic() - t < 3.0, "the killed leader was noticed too late"
        assert b"[DONE]" not in b"".join(got)
        follower.close()
        lead(b, "kill").finish(False)  # regroup: this gateway leads now


def test_a_redis_outage_then_recovery_between_processes(clean_redis: RedisServer) -> None:
    proc = peer(clean_redis, "mp-out", "5", "0.01", "wait-follower")
    b = Flights(clean_redis.url, backoff_s=0.2, spawn=_thread)
    try:
        wait_until(lambda: "LEADING" in proc.output(), timeout=10, what="the peer leads")
        clean_redis.stop()
        role = b.join("mp-out")
        assert isinstance(role, Leader) and role.value is None  # alone, no exception
        role.finish(False)
        assert proc.wait(15) == 0, proc.output()  # the peer finished alone too, no exception
        assert "ALONE" in proc.output() or "FINISHED" in proc.output()
        clean_redis.start()
        proc2 = peer(clean_redis, "mp-back", "3", "0.01", "wait-follower")
        try:
            wait_until(lambda: "LEADING" in proc2.output(), timeout=10, what="the peer leads again")
            follower = wait_until(lambda: _follower_or_none(b, "mp-back"), timeout=5, what="b follows again")
            assert follower.wait_head(10) == HEAD
            assert len(list(follower.chunks(10))) == 4
        finally:
            proc2.stop()
    finally:
        proc.stop()
        b.close()


def _follower_or_none(f: Flights, key: str) -> Follower | None:
    role = f.join(key)
    if isinstance(role, Follower):
        return role
    role.finish(False)
    return None
