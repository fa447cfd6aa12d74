from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ntonix.cache import ResponseCache, build_cache
from ntonix.cache.lmdb_env import StoreError
from ntonix.cache.memory import MemoryLRU
from ntonix.cache.remote import RedisStore
from ntonix.cache.shared import LmdbStore
from ntonix.core.cache_entry import CachedResponse
from tests.fakes import FakeClock
from tests.live.servers import RedisServer

STATS_KEYS = {"enabled", "entries", "size_bytes", "max_size_bytes", "hits", "misses", "hit_rate", "evictions"}
T0 = 1_700_000_000.0




class Clocks:
    """One fake time for every tier: monotonic for L1, wall clock for L2 and the facade."""

    def __init__(self) -> None:
        self.mono = FakeClock(500.0)
        self.wall = FakeClock(T0)

    def advance(self, seconds: float) -> None:
        self.mono.advance(seconds)
        self.wall.advance(seconds)


def entry(body: bytes = b'{"ok":1}', status: int = 200, created: float = T0) -> CachedResponse:
    return CachedResponse(status, (("Content-Type", "application/json"),), body, created, False)


def worker(path: Path, clocks: Clocks, ttl: float = 60, max_bytes: int = 1_000_000,
           remote: RedisStore | None = None) -> ResponseCache:
    """One worker process's view: its own L1, the host's L2."""
    return ResponseCache(
        MemoryLRU(max_bytes // 4, ttl, clock=clocks.mono),
        LmdbStore(str(path), max_bytes, ttl, clock=clocks.wall),
        remote,
        True,
        clock=clocks.wall,
    )


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def test_disabled_cache_does_nothing(tmp_path: Path) -> None:
    cache = build_cache(False, 1000, 60, str(tmp_path), None)
    cache.store("k", entry())
    assert cache.lookup("k") is None
    assert cache.stats() == {"enabled": False, "entries": 0, "size_bytes": 0, "max_size_bytes": 1000,
                             "hits": 0, "misses": 0, "hit_rate": 0.0, "evictions": 0}
    assert not (tmp_path / "store").exists()


def test_stats_have_exactly_the_interface_keys(tmp_path: Path, clocks: Clocks) -> None:
    cache = worker(tmp_path, clocks)
    assert set(cache.stats()) == STATS_KEYS
    cache.store("k", entry())
    assert cache.lookup("k") == entry()
    assert cache.lookup("nope") is None
    assert cache.stats() == {"enabled": True, "entries": 1, "size_bytes": len(entry().encode()),
                             "max_size_bytes": 1_000_000, "hits": 1, "misses": 1, "hit_rate": 0.5, "evictions": 0}


def test_only_status_200_is_stored(tmp_path: Path, clocks: Clocks) -> None:
    cache = worker(tmp_path, clocks)
    for status in (201, 204, 400, 429, 500, 502):
        cache.store(f"k{status}", entry(status=status))
        assert cache.lookup(f"k{status}") is None
    assert cache.stats()["entries"] == 0


def test_a_hit_is_a_hit_whichever_worker_serves_it(tmp_path: Path, clocks: Clocks) -> None:
    a, b = worker(tmp_path, clocks), worker(tmp_path, clocks)
    a.store("k", entry())
    assert b.lookup("k") == entry()  # from L2, promoted into b's L1
    assert b.memory is not None and "k" in b.memory
    assert b.lookup("k") == entry()  # from L1
    assert a.lookup("missing") is None
    stats = a.stats()
    assert (stats["hits"], stats["misses"]) == (2, 1)
    assert stats == b.stats()


def test_purge_in_one_worker_clears_every_workers_l1(tmp_path: Path, clocks: Clocks) -> None:
    a, b = worker(tmp_path, clocks), worker(tmp_path, clocks)
    a.store("k", entry())
    assert b.lookup("k") is not None  # now in b's L1 too
    assert a.purge() == 1
    assert b.lookup("k") is None
    assert a.lookup("k") is None
    assert a.stats()["entries"] == 0
    b.store("k", entry())
    assert a.lookup("k") is not None


def test_ttl_counts_from_created_in_every_tier(tmp_path: Path, clocks: Clocks) -> None:
    a, b = worker(tmp_path, clocks, ttl=60), worker(tmp_path, clocks, ttl=60)
    a.store("k", entry(created=T0))
    clocks.advance(50)
    assert b.lookup("k") is not None  # promoted into b's L1 with 10 s to live, not 60
    clocks.advance(9.9)
    assert a.lookup("k") is not None and b.lookup("k") is not None
    clocks.advance(0.2)
    assert a.lookup("k") is None and b.lookup("k") is None
    assert a.stats()["entries"] == 0


def test_l1_hits_keep_the_l2_entry_recently_used(tmp_path: Path, clocks: Clocks) -> None:
    size = len(entry(b"x" * 100).encode())
    cache = worker(tmp_path, clocks, ttl=1e6, max_bytes=2 * size + 10)
    assert cache.memory is not None
    cache.memory.max_bytes = 10 * size
    cache.store("hot", entry(b"x" * 100))
    clocks.advance(2)
    cache.store("cold", entry(b"x" * 100))
    clocks.advance(2)
    assert cache.lookup("hot") is not None  # an L1 hit, reported to L2 as a touch
    cache.store("new", entry(b"x" * 100))
    assert cache.shared is not None
    assert cache.shared.get("hot", touch=False) is not None
    assert cache.shared.get("cold", touch=False) is None
    assert cache.stats()["evictions"] == 1


def test_an_entry_l2_evicted_is_not_served_from_any_worker_l1(tmp_path: Path, clocks: Clocks) -> None:
    size = len(entry(b"x" * 100).encode())
    a = worker(tmp_path, clocks, ttl=1e6, max_bytes=3 * size + 10)
    b = worker(tmp_path, clocks, ttl=1e6, max_bytes=3 * size + 10)
    for cache in (a, b):
        assert cache.memory is not None
        cache.memory.max_bytes = 10 * size  # every L1 could keep them all
    for k in "ABC":
        a.store(k, entry(b"x" * 100))
    assert b.lookup("B") is not None  # now in b's L1 too
    assert a.lookup("A") is not None and a.lookup("C") is not None  # B is the least recently used
    a.store("D", entry(b"x" * 100))
    assert [k for k in "ABCD" if b.lookup(k) is not None] == ["A", "C", "D"]
    assert b.memory is not None and "B" not in b.memory


def test_a_broken_shared_store_degrades_to_misses(tmp_path: Path, clocks: Clocks,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a directory")
    cache = ResponseCache(MemoryLRU(10_000, 60, clock=clocks.mono),
                          LmdbStore(str(tmp_path / "file"), 10_000, 60, clock=clocks.wall), None, True,
                          clock=clocks.wall)
    with caplog.at_level(logging.WARNING, logger="ntonix.cache"):
        cache.store("k", entry())
        assert cache.lookup("k") == entry()  # L1 still works
        assert cache.lookup("x") is None
        stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1)  # this worker's view
    assert [r.message for r in caplog.records] == ["cache.store_failed"]  # once, not per call


def test_memory_only_cache_counts_locally(clocks: Clocks) -> None:
    cache = ResponseCache(MemoryLRU(10_000, 60, clock=clocks.mono), None, None, True, clock=clocks.wall)
    cache.store("k", entry())
    assert cache.lookup("k") is not None and cache.lookup("j") is None
    stats = cache.stats()
    assert (stats["entries"], stats["hits"], stats["misses"], stats["max_size_bytes"]) == (1, 1, 1, 10_000)
    assert cache.purge() == 1 and cache.lookup("k") is None


def test_build_cache_layout(tmp_path: Path) -> None:
    cache = build_cache(True, 64 * 1024 * 1024, 60, str(tmp_path), None)
    assert cache.memory is not None and cache.memory.max_bytes == 16 * 1024 * 1024
    assert cache.shared is not None and cache.shared.path == str(tmp_path / "store")
    assert cache.remote is None
    assert "memory+lmdb" in repr(cache)
    cache.store("k", entry(created=time.time()))
    assert cache.lookup("k") is not None
    small = build_cache(True, 1000, 60, str(tmp_path / "b"), "redis://127.0.0.1:1/0", memory_max_bytes=0)
    assert small.memory is None and small.remote is not None


@pytest.mark.redis
def test_redis_tier_is_shared_by_gateways_and_promoted(tmp_path: Path, clocks: Clocks,
                                                       clean_redis: RedisServer) -> None:
    clocks.wall.now = time.time()
    gw1 = worker(tmp_path / "gw1", clocks, remote=RedisStore(clean_redis.url, 60))
    gw2 = worker(tmp_path / "gw2", clocks, remote=RedisStore(clean_redis.url, 60))
    e = entry(created=clocks.wall.now)
    gw1.store("k", e)
    assert gw2.lookup("k") == e  # from Redis, into gw2's L2 and L1
    assert gw2.shared is not None and gw2.shared.get("k") == e
    assert gw2.stats()["hits"] == 1 and gw1.stats()["hits"] == 0


def test_lookup_without_counting_then_record(tmp_path: Path, clocks: Clocks) -> None:
    cache = worker(tmp_path, clocks)
    assert cache.lookup("k", count=False) is None
    cache.record("k", True)  # e.g. answered by a coalesced leader: the client saw a HIT
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (1, 0)


def test_deferred_stores_reach_l2_together_when_the_callback_runs(tmp_path: Path, clocks: Clocks) -> None:
    a, b = worker(tmp_path, clocks), worker(tmp_path, clocks)
    scheduled: list[object] = []
    a.store("k1", entry(b'{"n":1}'), defer=scheduled.append)
    a.store("k2", entry(b'{"n":2}'), defer=scheduled.append)
    assert scheduled == [a.flush]  # one write for both
    assert a.lookup("k1") is not None  # this worker's L1 has it at once
    assert b.lookup("k1") is None and b.lookup("k2") is None  # the host's L2 not yet
    a.flush()
    assert [e.body for e in (b.lookup("k1"), b.lookup("k2")) if e is not None] == [b'{"n":1}', b'{"n":2}']
    assert b.stats()["entries"] == 2
    a.store("k3", entry(), defer=scheduled.append)
    assert len(scheduled) == 2  # a new batch, a new callback


def test_l2_writes_the_encoding_the_caller_made_already(tmp_path: Path, clocks: Clocks,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``store(encoded=...)`` (the bytes made for the Redis tier): L2 writes them as they are,
    queued or not, and encodes only the entries stored without them."""
    a, b = worker(tmp_path, clocks), worker(tmp_path, clocks)
    made = {k: entry(f'{{"n":"{k}"}}'.encode()).encode() for k in ("k1", "k2")}
    encoded_now: list[bytes] = []
    real = CachedResponse.encode
    monkeypatch.setattr(CachedResponse, "encode", lambda self: encoded_now.append(self.body) or real(self))
    scheduled: list[Callable[[], None]] = []
    a.store("k1", entry(b"a stand-in the bytes replace"), defer=scheduled.append, encoded=made["k1"])
    a.store("k2", entry(b"another stand-in"), encoded=made["k2"])
    a.store("k3", entry(b'{"n":"k3"}'), defer=scheduled.append)
    scheduled[0]()
    assert [e.body for e in (b.lookup(k) for k in ("k1", "k2", "k3")) if e is not None] == [
        b'{"n":"k1"}', b'{"n":"k2"}', b'{"n":"k3"}']
    assert encoded_now == [b'{"n":"k3"}']


def test_a_batch_evicts_older_entries_never_its_own(tmp_path: Path, clocks: Clocks) -> None:
    store = LmdbStore(str(tmp_path), 40_000, 60, clock=clocks.wall)
    for i in range(3):
        clocks.advance(1)
        store.put(f"old{i}", entry(b"x" * 9_000))
    clocks.advance(1)
    store.put_many([(f"new{i}", entry(b"y" * 9_000, created=clocks.wall())) for i in range(3)])
    assert [store.get(f"new{i}", touch=False) is not None for i in range(3)] == [True] * 3
    assert store.get("old0", touch=False) is None  # the least recently used went
    assert store.stats()["entries"] < 6


def test_a_batch_written_after_another_workers_later_store_keeps_the_order_of_the_stores(
        tmp_path: Path, clocks: Clocks) -> None:
    # Worker a stores B; its batch is written at the end of its loop turn, after worker b
    # stored C and wrote it. B was stored first, so B is the least recently used (docs/cache.md:
    # "store A, B, C, read A, store D: B goes").
    a, b = worker(tmp_path, clocks, max_bytes=40_000), worker(tmp_path, clocks, max_bytes=40_000)
    later: list[Callable[[], None]] = []
    a.store("B", entry(b"b" * 9_000, created=clocks.wall()), defer=later.append)
    clocks.advance(0.000_01)
    b.store("C", entry(b"c" * 9_000, created=clocks.wall()))
    clocks.advance(0.000_01)
    later.pop()()
    for i in range(3):  # fill until one entry must go
        clocks.advance(0.000_01)
        b.store(f"fill{i}", entry(b"f" * 9_000, created=clocks.wall()))
    assert b.shared is not None
    assert b.shared.get("B", touch=False) is None
    assert b.shared.get("C", touch=False) is not None


def test_after_the_clock_steps_back_a_batched_store_is_still_the_newest(tmp_path: Path, clocks: Clocks) -> None:
    # Its own store time, an hour before every stamp in L2, would make it the first to go.
    a, b = worker(tmp_path, clocks, ttl=86_400, max_bytes=40_000), worker(tmp_path, clocks, ttl=86_400,
                                                                          max_bytes=40_000)
    for i in range(3):
        clocks.advance(1)
        b.store(f"old{i}", entry(b"o" * 9_000, created=clocks.wall()))
    clocks.wall.advance(-3600)  # an NTP step, a restored VM
    later: list[Callable[[], None]] = []
    a.store("new", entry(b"n" * 9_000, created=clocks.wall()), defer=later.append)
    later.pop()()
    clocks.advance(1)
    b.store("fill", entry(b"f" * 9_000, created=clocks.wall()))  # one entry must go
    assert b.shared is not None
    assert b.shared.get("new", touch=False) is not None
    assert b.shared.get("old0", touch=False) is None


def test_a_deferred_store_keeps_the_answer_out_of_l1_and_l1_takes_it_when_l2_fails(
        tmp_path: Path, clocks: Clocks, monkeypatch: pytest.MonkeyPatch) -> None:
    a = worker(tmp_path, clocks)
    assert a.memory is not None and a.shared is not None
    scheduled: list[Callable[[], None]] = []
    a.store("k1", entry(b'{"n":1}'), defer=scheduled.append)
    assert a.memory.entries == 0  # L1 holds the hot set: an answer enters it on a hit
    found = a.lookup("k1", count=False)  # this worker's request for it finds the queued answer
    assert found is not None and found.body == b'{"n":1}'
    scheduled.pop()()
    assert a.memory.entries == 0 and a.shared.get("k1", touch=False) is not None

    def refused(*args: object) -> int:
        raise StoreError("disk full")

    monkeypatch.setattr(a.shared, "put_many", refused)
    monkeypatch.setattr(a.shared, "touch", refused)  # the whole store fails (disk, permissions)
    a.store("k2", entry(b'{"n":2}'), defer=scheduled.append)
    scheduled.pop()()  # the write fails: this worker's L1 serves the answer, as without deferral
    assert a.memory.entries == 1
    found = a.lookup_memory("k2")
    assert found is not None and found.body == b'{"n":2}'


def test_a_batch_larger_than_the_bound_keeps_the_bound_and_its_newest(tmp_path: Path, clocks: Clocks) -> None:
    store = LmdbStore(str(tmp_path), 40_000, 60, clock=clocks.wall)
    store.put("old", entry(b"x" * 9_000))
    clocks.advance(1)
    store.put_many([(f"new{i}", entry(b"y" * 9_000, created=clocks.wall())) for i in range(6)])
    assert store.stats()["size_bytes"] <= 40_000
    kept = [i for i in range(6) if store.get(f"new{i}", touch=False) is not None]
    assert kept == list(range(6 - len(kept), 6)) and len(kept) >= 4  # the oldest of the batch went
    assert store.get("old", touch=False) is None


def test_a_purge_by_another_worker_drops_the_answers_queued_before_it(tmp_path: Path, clocks: Clocks) -> None:
    a, b = worker(tmp_path, clocks), worker(tmp_path, clocks)
    scheduled: list[Callable[[], None]] = []
    a.store("k1", entry(b'{"n":1}'), defer=scheduled.append)
    assert a.lookup("k1", count=False) is not None
    b.purge()
    assert a.lookup("k1", count=False) is None  # not served from the queue after the purge
    a.store("k2", entry(b'{"n":2}'), defer=scheduled.append)  # stored after it: kept
    for callback in scheduled:
        callback()
    assert b.lookup("k1") is None
    found = b.lookup("k2")
    assert found is not None and found.body == b'{"n":2}'


def test_a_purge_between_the_store_and_the_write_leaves_nothing_behind(tmp_path: Path, clocks: Clocks) -> None:
    a, b = worker(tmp_path, clocks), worker(tmp_path, clocks)
    scheduled: list[Callable[[], None]] = []
    a.store("k1", entry(b'{"n":1}'), defer=scheduled.append)
    b.purge()
    scheduled.pop()()  # the write comes after the purge: the answer stored before it is not written
    assert b.lookup("k1") is None and a.lookup("k1") is None


def test_what_then_is_given_runs_right_after_the_deferred_write_in_order(tmp_path: Path, clocks: Clocks,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """``then``: e.g. a flight's end, which must come after its answer is in L2; one callback
    for the write and everything after it, and a failing one does not keep the rest from running."""
    a, b = worker(tmp_path, clocks), worker(tmp_path, clocks)
    scheduled: list[Callable[[], None]] = []
    ran: list[object] = []
    a.then(lambda: ran.append("alone"), scheduled.append)  # nothing queued: still at the next turn
    assert len(scheduled) == 1 and ran == []
    scheduled.pop()()
    assert ran == ["alone"]
    a.store("k1", entry(b'{"n":1}'), defer=scheduled.append)
    a.then(lambda: ran.append(b.lookup("k1", count=False) is not None), scheduled.append)

    def broken() -> None:
        raise RuntimeError("a flight's end that fails")

    a.then(broken, scheduled.append)
    a.store("k2", entry(b'{"n":2}'), defer=scheduled.append)
    a.then(lambda: ran.append(b.lookup("k2", count=False) is not None), scheduled.append)
    assert len(scheduled) == 1  # one callback for the batch and what follows it
    with caplog.at_level(logging.ERROR, logger="ntonix.cache"):
        scheduled.pop()()
    assert ran == ["alone", True, True]  # each ran after the write, in order, past the failure
    assert any(r.message == "cache.after_write_failed" for r in caplog.records)
    a.then(lambda: ran.append("next"), scheduled.append)
    assert len(scheduled) == 1  # a new turn, a new callback


def test_every_committed_l2_write_is_told_before_the_flights_that_wait_on_it_end(tmp_path: Path) -> None:
    # The coalescing board's store counter moves on this notice (ntonix/cache/board.py): in the
    # batched write it must come after the commit and before the flights' ends (``then``).
    cache = build_cache(True, 1_000_000, 60, str(tmp_path), None)
    events: list[str] = []
    cache.on_stored = lambda: events.append("stored" if cache.shared and cache.shared.get("k") else "not yet")
    callbacks: list[Callable[[], None]] = []
    entry = CachedResponse(status=200, headers=(), body=b"{}", created=time.time(), streamed=False)
    cache.store("k", entry, defer=callbacks.append)
    cache.then(lambda: events.append("flight ended"), callbacks.append)
    assert events == [] and len(callbacks) == 1  # one flush for both
    callbacks[0]()
    assert events == ["stored", "flight ended"]
    cache.store("j", entry)  # not deferred: told at once
    assert events[-1] == "stored"


def test_a_failed_l2_write_is_not_told(tmp_path: Path) -> None:
    cache = build_cache(True, 1_000_000, 60, str(tmp_path), None)
    told: list[int] = []
    cache.on_stored = lambda: told.append(1)

    def broken(*args: object, **kw: object) -> int:
        raise StoreError("disk full")

    assert cache.shared is not None
    cache.shared.put_many = broken  # type: ignore[method-assign]
    cache.store("k", CachedResponse(status=200, headers=(), body=b"{}", created=time.time(), streamed=False))
    assert told == []
