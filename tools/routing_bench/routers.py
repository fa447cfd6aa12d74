"""Client-side routers of the routing benchmark: round-robin, user hash, and the reference router.

The benchmark process sends every request of a run itself, so a router living in it sees all
traffic and every request in flight, like a single-process gateway would. Three of them give the
table its yardsticks (tools/routing_bench/run.py picks one per row):

- ``RoundRobin``: what a blind proxy does (the ``direct`` row: no proxy at all).
- ``UserHash``: pins each conversation to one backend (session affinity).
- ``ReferenceRouter``: longest prefix match with a least-outstanding fallback, the ~150-line
  design issue #16 gives for scale. It keeps, per backend, an LRU of the chained hashes of
  64-character blocks of the prompts it sent there (a character-level approximate index, as
  SGLang's router and the GIE prefix scorer do: no tokenizer), bounded like the backend's KV
  cache. A request goes to the backend holding its longest prefix, among the backends not
  markedly busier than the least busy one (``slack`` requests in flight); with no prefix known
  anywhere, to the least busy backend.

All three are pure: ``pick`` returns an index, ``done`` releases it; nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence

BLOCK_CHARS = 64


class Router:
    """``pick(user, text, candidates) -> index``; ``done(index)`` when the answer is complete."""

    name = "router"

    def __init__(self, backends: int) -> None:
        self.backends = backends
        self.in_flight = [0] * backends

    def pick(self, user: int, text: str, candidates: Sequence[int]) -> int:
        index = self._choose(user, text, candidates)
        self.in_flight[index] += 1
        return index

    def done(self, index: int) -> None:
        self.in_flight[index] -= 1

    def _choose(self, user: int, text: str, candidates: Sequence[int]) -> int:
        raise NotImplementedError


class RoundRobin(Router):
    """Each backend in turn, whatever the request (``candidates`` ignored, as a blind proxy does)."""

    name = "round_robin"

    def __init__(self, backends: int) -> None:
        super().__init__(backends)
        self._next = itertools.cycle(range(backends))

    def _choose(self, user: int, text: str, candidates: Sequence[int]) -> int:
        return next(self._next)


class UserHash(Router):
    """Conversation ``user`` always on the same suitable backend."""

    name = "user_hash"

    def _choose(self, user: int, text: str, candidates: Sequence[int]) -> int:
        digest = hashlib.blake2b(str(user).encode(), digest_size=8).digest()
        return candidates[int.from_bytes(digest, "big") % len(candidates)]


def char_block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """Chained hashes of the full ``block_chars``-character blocks of ``text``."""
    out: list[bytes] = []
    parent = b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        parent = hashlib.blake2b(parent + text[start:start + block_chars].encode(), digest_size=8).digest()
        out.append(parent)
    return out


class BlockIndex:
    """What one backend was recently sent: an LRU of at most ``capacity`` block hashes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of ``hashes`` are held (chained: the first miss ends it)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def add(self, hashes: Sequence[bytes]) -> None:
        for h in hashes:
            if h in self._blocks:
                self._blocks.move_to_end(h)
            else:
                self._blocks[h] = None
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


class ReferenceRouter(Router):
    """Longest prefix match among backends within ``slack`` of the least busy, else least busy."""

    name = "reference"

    def __init__(self, backends: int, capacity_blocks: int, slack: int = 4) -> None:
        super().__init__(backends)
        self.indexes = [BlockIndex(capacity_blocks) for _ in range(backends)]
        self.slack = slack
        self._tie = itertools.count()  # rotates among equally idle backends

    def __repr__(self) -> str:
        sizes = [len(i) for i in self.indexes]
        return f"<ReferenceRouter in_flight={self.in_flight} index_blocks={sizes} slack={self.slack}>"

    def _choose(self, user: int, text: str, candidates: Sequence[int]) -> int:
        hashes = char_block_hashes(text)
        least = min(self.in_flight[i] for i in candidates)
        eligible = [i for i in candidates if self.in_flight[i] <= least + self.slack]
        matches = {i: self.indexes[i].match(hashes) for i in eligible}
        best = max(matches.values())
        if best > 0:
            # Longest match; among equal matches, the least busy.
            index = min((i for i in eligible if matches[i] == best), key=lambda i: self.in_flight[i])
        else:
            idle = [i for i in candidates if self.in_flight[i] == least]
            index = idle[next(self._tie) % len(idle)]
        self.indexes[index].add(hashes)
        return index
