from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from ntonix.cache.shared import LmdbStore, StoreError
from ntonix.core.cache_entry import CachedResponse
from tests.fakes import FakeClock

T0 = 1_700_000_000.0


def entry(size: int, created: float = T0, tag: bytes = b"x") -> CachedResponse:
    return CachedResponse(200, (("Content-Type", "application/json"),), tag * size, created, False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def store_at(path: Path, clock: FakeClock, max_bytes: int = 100_000, ttl: float = 60, **kw: float) -> LmdbStore:
    return LmdbStore(str(path), max_bytes, ttl, clock=clock, **kw)  # type: ignore[arg-type]


def test_round_trip_stats_and_private_directory(tmp_path: Path, clock: FakeClock) -> None:
    s = store_at(tmp_path / "c", clock)
    assert s.get("k") is None
    e = entry(100)
    assert s.put("k", e) == 0
    assert s.get("k") == e
    st = s.stats()
    assert set(st) >= {"entries", "size_bytes", "max_size_bytes", "hits", "misses", "evictions", "generation"}
    assert (st["entries"], st["size_bytes"], st["max_size_bytes"]) == (1, len(e.encode()), 100_000)
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o700
    s.put("k", entry(10))  # replacing re-accounts
    assert s.stats()["size_bytes"] == len(entry(10).encode())
    assert s.delete("k") and not s.delete("k")
    assert s.stats()["entries"] == 0 and s.stats()["size_bytes"] == 0


def test_two_instances_share_one_environment(tmp_path: Path, clock: FakeClock) -> None:
    a, b = store_at(tmp_path, clock), store_at(tmp_path, clock)
    a.put("k", entry(5))
    assert b.get("k") == entry(5)
    b.record_lookup(None, True)
    a.record_lookup(None, False)
    assert a.stats()["hits"] == b.stats()["hits"] == 1
    assert a.stats()["misses"] == 1


def test_ttl_is_honoured_from_created(tmp_path: Path, clock: FakeClock) -> None:
    s = store_at(tmp_path, clock, ttl=10)
    s.put("a", entry(10, created=T0 - 5))  # already 5 s old
    clock.advance(4.9)
    assert s.get("a") is not None
    clock.advance(0.1)
    assert s.get("a") is None
    st = s.stats()
    assert (st["entries"], st["size_bytes"], st["expired"], st["evictions"]) == (0, 0, 1, 0)
    assert s.put("old", entry(10, created=T0 - 100)) == 0  # expired on arrival: not stored
    assert s.get("old") is None


def test_put_sweeps_entries_untouched_for_a_ttl(tmp_path: Path, clock: FakeClock) -> None:
    s = store_at(tmp_path, clock, ttl=10)
    for i in range(5):
        s.put(f"old{i}", entry(10))
    clock.advance(11)
    s.put("new", entry(10, created=clock.now))
    st = s.stats()
    assert (st["entries"], st["expired"]) == (1, 5)


def test_stats_sweep_what_expired_with_no_store_since(tmp_path: Path, clock: FakeClock) -> None:
    s = store_at(tmp_path, clock, ttl=10)
    for i in range(40):
        s.put(f"k{i}", entry(10))
    assert s.stats()["entries"] == 40
    clock.advance(11)
    st = s.stats()
    assert (st["entries"], st["size_bytes"], st["expired"]) == (0, 0, 40)


def test_byte_bound_holds_while_filling_far_past_it(tmp_path: Path, clock: FakeClock) -> None:
    s = store_at(tmp_path, clock, max_bytes=20_000, ttl=1e9)
    evicted = 0
    for i in range(1500):
        clock.advance(0.001)
        evicted += s.put(f"k{i}", entry(50 + i % 400, created=clock.now))
        assert s.stats()["size_bytes"] <= 20_000
    st = s.stats()
    assert st["evictions"] == evicted > 1000
    found = {i: s.get(f"k{i}", touch=False) for i in range(1500)}
    live = {i: e for i, e in found.items() if e is not None}
    assert len(live) == st["entries"]
    assert list(live) == list(range(1500 - len(live), 1500))  # the newest survived, the oldest went first
    assert st["size_bytes"] == sum(len(e.encode()) for e in live.values())


def test_lru_order_with_touch_on_hit(tmp_path: Path, clock: FakeClock) -> None:
    size = len(entry(100).encode())
    s = store_at(tmp_path, clock, max_bytes=3 * size, ttl=1e9)
    for k in "abc":
        s.put(k, entry(100))
    assert s.get("a") is not None  # same microsecond as the puts: the order still counts
    s.put("d", entry(100))
    assert [k for k in "abcd" if s.get(k, touch=False)] == ["a", "c", "d"]


def test_touch_from_a_memory_hit_keeps_the_shared_lru_order(tmp_path: Path, clock: FakeClock) -> None:
    size = len(entry(100).encode())
    s = store_at(tmp_path, clock, max_bytes=3 * size, ttl=1e9)
    for k in "abc":
        s.put(k, entry(100))
    assert s.touch("a") is True  # served from a worker's memory tier: no read of the entry itself
    assert s.touch("missing") is False  # gone: the caller must not serve its copy
    s.put("d", entry(100))
    assert [k for k in "abcd" if s.get(k, touch=False)] == ["a", "c", "d"]
    assert s.touch("b") is False


def test_a_clock_stepped_back_does_not_reorder(tmp_path: Path, clock: FakeClock) -> None:
    size = len(entry(100).encode())
    s = store_at(tmp_path, clock, max_bytes=3 * size, ttl=1e9)
    s.put("a", entry(100))
    clock.advance(-5)
    s.put("b", entry(100))
    s.put("c", entry(100))
    assert s.get("a") is not None and s.get("b") is not None  # b now newest, then a; c oldest
    s.put("d", entry(100))
    assert [k for k in "abcd" if s.get(k, touch=False)] == ["a", "b", "d"]


def test_a_hit_writes_only_when_something_else_was_used_after_it(tmp_path: Path, clock: FakeClock) -> None:
    s = store_at(tmp_path, clock, ttl=1e9)
    s.put("a", entry(100))
    s.put("b", entry(100))
    pages = s._open().env.info()["last_txnid"]
    assert s.get("b") is not None and s.touch("b")  # b is the most recent: no write
    assert s._open().env.info()["last_txnid"] == pages
    assert s.get("a") is not None  # b was stored after a: one write
    assert s._open().env.info()["last_txnid"] == pages + 1
    for _ in range(100):
        assert s.get("a") is not None and s.touch("a")
    assert s._open().env.info()["last_txnid"] == pages + 1


def test_record_lookup_counts_and_touches(tmp_path: Path, clock: FakeClock) -> None:
    size = len(entry(100).encode())
    s = store_at(tmp_path, clock, max_bytes=2 * size, ttl=1e9)
    s.put("a", entry(100))
    clock.advance(2)
    s.put("b", entry(100))
    clock.advance(2)
    assert s.record_lookup("a", True) == 1
    assert s.record_lookup("zzz", False) == 1
    s.put("c", entry(100))
    assert s.get("a", touch=False) is not None and s.get("b", touch=False) is None
    st = s.stats()
    assert (st["hits"], st["misses"]) == (1, 1)


def test_oversized_entry_is_not_stored(tmp_path: Path, clock: FakeClock) -> None:
    s = store_at(tmp_path, clock, max_bytes=1000)
    s.put("small", entry(10))
    assert s.put("big", entry(2000)) == 0
    assert s.get("big") is None and s.get("small") is not None


def test_purge_empties_and_bumps_the_generation(tmp_path: Path, clock: FakeClock) -> None:
    s = store_at(tmp_path, clock)
    other = store_at(tmp_path, clock)
    for i in range(7):
        s.put(f"k{i}", entry(10))
    s.record_lookup(None, True)
    g = other.generation()
    assert s.purge() == 7
    assert other.generation() == g + 1
    st = other.stats()
    assert (st["entries"], st["size_bytes"], st["hits"]) == (0, 0, 1)
    assert other.get("k1") is None
    s.put("k1", entry(10))
    assert other.get("k1") is not None


def test_map_full_makes_room_instead_of_failing(tmp_path: Path, clock: FakeClock) -> None:
    # A map far smaller than max_bytes: LMDB runs out of pages long before the byte bound.
    s = store_at(tmp_path, clock, max_bytes=50_000_000, ttl=1e9, map_size=2 * 1024 * 1024)
    for i in range(200):
        clock.advance(0.001)
        s.put(f"k{i}", entry(60_000, created=clock.now))
    assert s.get("k199") is not None
    assert 0 < s.stats()["entries"] < 200


def test_errors_are_translated(tmp_path: Path, clock: FakeClock) -> None:
    (tmp_path / "file").write_text("not a directory")
    s = store_at(tmp_path / "file", clock)
    with pytest.raises(StoreError):
        s.get("k")
    with pytest.raises(ValueError):
        store_at(tmp_path / "ok", clock).get("")


def test_shared_across_fork_and_reopened_in_the_child(tmp_path: Path, clock: FakeClock) -> None:
    s = store_at(tmp_path, clock)
    s.put("parent", entry(10))  # opened here, before the fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            if s.get("parent", touch=False) == entry(10):
                s.put("child", entry(20))
                s.record_lookup(None, True)
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.get("child") == entry(20)
    assert s.stats()["hits"] == 1
    assert "open" in repr(s)


def test_concurrent_writers_keep_the_books_straight(tmp_path: Path) -> None:
    # Four processes hammer one store (real clock); afterwards the counters must match the data.
    s = LmdbStore(str(tmp_path), 50_000, 3600)
    children = []
    for n in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                now = time.time()
                for i in range(400):
                    s.put(f"k{(i * 7 + n) % 150}", entry(20 + (i * 31 + n) % 900, created=now))
                    s.get(f"k{i % 150}")
                    s.record_lookup(f"k{i % 150}", i % 2 == 0)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    st = s.stats()
    h = s._open()
    with h.env.begin() as txn:
        sizes = [len(v) for _, v in txn.cursor(db=h.data)]
        counts = [txn.stat(db)["entries"] for db in (h.data, h.meta, h.lru)]
    assert counts == [st["entries"]] * 3
    assert st["size_bytes"] == sum(sizes) <= 50_000
    assert st["hits"] + st["misses"] == 1600
