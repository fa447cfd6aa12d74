from __future__ import annotations

import random

import pytest

from ntonix.cache.memory import MemoryLRU
from ntonix.core.cache_entry import CachedResponse
from tests.fakes import FakeClock


def entry(size: int, tag: bytes = b"x") -> CachedResponse:
    """An entry whose ``size`` is exactly ``size`` (no headers)."""
    return CachedResponse(200, (), tag * size, 0.0, False)


def test_get_put_and_accounting() -> None:
    lru = MemoryLRU(1000, 60, clock=FakeClock())
    assert lru.get("a") is None
    assert lru.put("a", entry(100)) == 0
    assert lru.get("a") == entry(100)
    assert (lru.entries, lru.size_bytes, lru.evictions) == (1, 100, 0)
    lru.put("a", entry(300))  # replacing re-accounts
    assert (lru.entries, lru.size_bytes) == (1, 300)
    assert lru.delete("a") and not lru.delete("a")
    assert (lru.entries, lru.size_bytes) == (0, 0)


def test_evicts_least_recently_used_first() -> None:
    lru = MemoryLRU(300, 60, clock=FakeClock())
    for k in "abc":
        lru.put(k, entry(100))
    assert lru.keys() == ["c", "b", "a"]
    assert lru.get("a") is not None  # a is now the most recent; b the least
    assert lru.put("d", entry(100)) == 1
    assert lru.keys() == ["d", "a", "c"]
    assert lru.get("b") is None
    assert lru.put("e", entry(250)) == 3  # c, then a, then d make room
    assert lru.keys() == ["e"]
    assert (lru.size_bytes, lru.evictions) == (250, 4)


def test_eviction_order_matches_a_reference_model() -> None:
    rng = random.Random(7)
    lru = MemoryLRU(2000, 60, clock=FakeClock())
    model: dict[str, int] = {}  # insertion order = recency order (oldest first)
    for _ in range(3000):
        key = f"k{rng.randrange(40)}"
        if rng.random() < 0.5:
            got = lru.get(key)
            assert (got is not None) == (key in model)
            if key in model:
                model[key] = model.pop(key)
        else:
            size = rng.randrange(1, 400)
            lru.put(key, entry(size))
            model.pop(key, None)
            while model and sum(model.values()) + size > 2000:
                del model[next(iter(model))]
            model[key] = size
        assert lru.keys() == list(reversed(model))
        assert lru.size_bytes == sum(model.values()) <= 2000


def test_byte_bound_holds_while_filling_far_past_it() -> None:
    lru = MemoryLRU(10_000, 60, clock=FakeClock())
    total_evicted = 0
    for i in range(5000):
        total_evicted += lru.put(f"k{i}", entry(1 + i % 300))
        assert lru.size_bytes <= 10_000
    assert total_evicted == lru.evictions > 4000
    keys = lru.keys()
    assert lru.entries == len(keys)
    assert lru.size_bytes == sum(1 + int(k[1:]) % 300 for k in keys)


def test_entry_larger_than_the_bound_is_not_stored() -> None:
    lru = MemoryLRU(100, 60, clock=FakeClock())
    lru.put("a", entry(50))
    assert lru.put("big", entry(101)) == 0
    assert lru.get("big") is None and lru.get("a") is not None
    lru.put("a", entry(101))  # an oversized replacement drops the old value too
    assert lru.get("a") is None and lru.size_bytes == 0


def test_ttl_with_a_fake_clock() -> None:
    clock = FakeClock()
    lru = MemoryLRU(1000, 10, clock=clock)
    lru.put("a", entry(10))
    clock.advance(9.99)
    assert lru.get("a") is not None and "a" in lru
    clock.advance(0.01)
    assert "a" not in lru
    assert lru.get("a") is None
    assert lru.entries == 0 and lru.size_bytes == 0
    assert lru.evictions == 0  # expiry is not eviction


def test_age_shortens_the_ttl() -> None:
    clock = FakeClock()
    lru = MemoryLRU(1000, 10, clock=clock)
    lru.put("a", entry(10), age_s=8)
    clock.advance(1.9)
    assert lru.get("a") is not None
    clock.advance(0.2)
    assert lru.get("a") is None
    assert lru.put("b", entry(10), age_s=10) == 0
    assert lru.get("b") is None


def test_clear() -> None:
    lru = MemoryLRU(1000, 10, clock=FakeClock())
    for k in "abc":
        lru.put(k, entry(10))
    assert lru.clear() == 3
    assert (lru.entries, lru.size_bytes, lru.keys()) == (0, 0, [])
    lru.put("d", entry(10))
    assert lru.keys() == ["d"]


def test_repr_and_validation() -> None:
    assert "entries=0" in repr(MemoryLRU(10, 1))
    with pytest.raises(ValueError):
        MemoryLRU(-1, 1)
