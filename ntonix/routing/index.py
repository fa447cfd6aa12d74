"""The prefix index shared by all workers of a host: which backend recently served which prompt blocks.

Theory of operation
-------------------
A fixed-size open-addressed hash table in a shared file (``ntonix.routing.shm``), so memory is
bounded (24 bytes an entry) and every worker sees what the others routed. An entry is
``(key, mask, stamp)``: the chained hash of one prompt block (``ntonix.core.prompt``; it stands
for the whole prefix up to that block, and the model, tenant and salt are in its seed), a bitmask
of the backends that were sent a prompt holding it, and when it was last seen (ms of the host's
monotonic clock, the same in every process). A block is looked for in ``PROBE`` consecutive
entries from ``key % entries``; a new block takes an empty entry of that window, else the one
seen longest ago (least recently seen is forgotten first, as engines evict their KV cache).

Learning: when a request is sent, ``record`` adds its backend's bit to every block of its prompt
(the backend will hold them once it prefilled them). Before the answer, on purpose: the next turn
of a busy conversation, or a burst of requests sharing a system prompt, must already see them.
Blocks the backend was already known to hold are only refreshed, a stride of them per call.

Lookup: for each candidate backend, how many leading blocks of the prompt carry its bit. The
chain makes presence monotone (a backend that holds block i was sent blocks 0..i), so each
backend's run is found by binary search, sharing the probes between backends: about
``log2(blocks)`` probes, whatever the prompt length.

No locks: a worker writes an entry's mask and stamp before its key, and clears the key before
reusing the entry for another block, so a reader sees either a whole entry or a stale one. Two
workers racing on one entry can lose a bit or pair a key with the other's mask; the index is an
estimate (it also does not see what a backend evicts), and a wrong estimate costs one less
cache-friendly choice, never a wrong answer. The cached-token counts of answers (``core/usage``)
measure how good the estimate is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ntonix.routing.shm import SharedCells

__all__ = ["MAX_BACKENDS", "PROBE", "REFRESH_STRIDE", "PrefixIndex"]

PROBE = 8
REFRESH_STRIDE = 8
MAX_BACKENDS = 62  # bits of a signed 64-bit mask that stay positive
_KEY_BITS = (1 << 63) - 1


def _key(block_hash: int) -> int:
    return (block_hash & _KEY_BITS) or 1  # 0 marks an empty entry


class PrefixIndex:
    """A worker's handle on the host-wide prefix index in the file ``path``."""

    def __init__(self, path: str, entries: int = 262144, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.entries = entries
        self._clock = clock
        self._shm = SharedCells(path, 3 * entries, names=MAX_BACKENDS, signature=entries)
        self._q = self._shm.q
        self._base = self._shm.cell(0)
        self._turn = 0

    def bit(self, address: str) -> int:
        return 1 << self._shm.number(address)

    def _find(self, key: int) -> int:
        """The cell of ``key``'s entry, or -1."""
        q, base, n = self._q, self._base, self.entries
        slot = key % n
        for i in range(PROBE):
            cell = base + 3 * ((slot + i) % n)
            stored = q[cell]
            if stored == key:
                return cell
            if stored == 0:
                return -1
        return -1

    def _mask(self, block_hash: int) -> int:
        cell = self._find(_key(block_hash))
        return self._q[cell + 1] if cell >= 0 else 0

    def record(self, blocks: Sequence[int], address: str, known: int = 0) -> None:
        """``address`` was sent a prompt made of ``blocks``: it holds them from now on.

        ``known``: how many leading blocks ``matched`` already found for ``address``. Those are
        only touched (their stamp refreshed) at every ``REFRESH_STRIDE``-th position, from an
        offset that turns with every call, so a long conversation costs a few probes per turn
        for its history plus one write per new block, and each history block is still refreshed
        every few turns.
        """
        bit = self.bit(address)
        now = int(self._clock() * 1000)
        known = min(known, len(blocks))
        if known:
            self._turn = (self._turn + 1) % REFRESH_STRIDE
            for i in range(self._turn, known, REFRESH_STRIDE):
                cell = self._find(_key(blocks[i]))
                if cell >= 0:
                    self._q[cell + 2] = now
        for i in range(known, len(blocks)):
            self._put(_key(blocks[i]), bit, now)

    def _put(self, key: int, bit: int, now: int) -> None:
        q, base, n = self._q, self._base, self.entries
        slot = key % n
        victim, oldest = -1, -1
        for i in range(PROBE):
            cell = base + 3 * ((slot + i) % n)
            stored = q[cell]
            if stored == key:
                q[cell + 1] |= bit
                q[cell + 2] = now
                return
            if stored == 0:
                victim = cell
                break
            stamp = q[cell + 2]
            if oldest < 0 or stamp < oldest:
                victim, oldest = cell, stamp
        else:
            q[victim] = 0  # evict: readers see no entry rather than a half-written one
        q[victim + 1] = bit
        q[victim + 2] = now
        q[victim] = key

    def matched(self, blocks: Sequence[int], addresses: Sequence[str]) -> dict[str, int]:
        """For each address, how many leading ``blocks`` it is believed to hold."""
        bits = {address: self.bit(address) for address in addresses}
        masks: dict[int, int] = {}

        def mask_at(i: int) -> int:
            m = masks.get(i)
            if m is None:
                m = masks[i] = self._mask(blocks[i])
            return m

        out = {}
        for address, bit in bits.items():
            lo, hi = 0, len(blocks)  # invariant: blocks[:lo] held, blocks[hi:] not
            while lo < hi:
                mid = (lo + hi) // 2
                if mask_at(mid) & bit:
                    lo = mid + 1
                else:
                    hi = mid
            out[address] = lo
        return out

    def forget(self, address: str) -> None:
        """Drop everything recorded for ``address`` (a backend removed, or restarted with an empty cache)."""
        keep = ~self.bit(address)
        q, base = self._q, self._base
        for e in range(self.entries):
            cell = base + 3 * e + 1
            if q[cell]:
                q[cell] &= keep

    def close(self) -> None:
        self._shm.close()

    def __repr__(self) -> str:
        return f"<PrefixIndex entries={self.entries} backends={len(self._shm.numbered())}>"
