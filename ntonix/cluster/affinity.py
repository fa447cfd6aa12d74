"""A shared view of prefix affinity: which backend each gateway sent a prompt prefix to (ADR 0009).

Theory of operation
-------------------
The ``prefix`` routing policy keeps, per gateway, an index of (model, block hash) -> backend
learnt from its own decisions. Gateways behind one balancer each see only part of a
conversation's turns, so their indexes drift apart. This board shares the assignments through
one Redis stream, **never on a request's critical path**:

* :meth:`AffinityBoard.record` (on the request path) appends to an in-memory batch: no I/O,
  bounded (``max_pending``; past it the oldest assignments are dropped — the newest say more
  about where a conversation is now).
* :meth:`AffinityBoard.sync` (in the background, every ``interval_s``) publishes the batch as
  one stream entry (``XADD ... MAXLEN ~ max_entries``, so the stream stays bounded, and an
  expiry, so it goes away when no gateway runs) and reads what other gateways published since
  its cursor (``XREAD COUNT``), returning their assignments for the caller to merge into its
  own index. A gateway's own entries are skipped.
* Redis slow or down: ``sync`` returns nothing and keeps the batch (bounded), after a
  failure it stays silent for ``backoff_s``; each gateway routes on its own index meanwhile.

A gateway that starts reads the stream from its start: at most ``max_entries`` batches, the
recent history of the cluster.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import orjson
import redis

from ntonix.cluster.resp import ERRORS, redis_py

log = logging.getLogger("ntonix.cluster")

STREAM = "ntonix:affinity"
# Leading blocks shared per decision: enough for a conversation to be matched on another gateway
# (256 blocks of routing.prefix_block_chars 256 = 64 KiB of prompt), bounded per entry.
MAX_SHARED_BLOCKS = 256


class Assignment(NamedTuple):
    model: str
    block: str  # the prefix block's hash, as the index writes it
    backend: str  # host:port


class AffinityBoard:
    """Publishes this gateway's assignments and collects the other gateways'."""

    def __init__(self, url: str, *, stream: str = STREAM, max_pending: int = 10_000, max_entries: int = 10_000,
                 read_batch: int = 500, ttl_s: float = 3600.0, timeout_s: float = 0.05, backoff_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.stream = url, stream
        self.max_entries, self.read_batch = max_entries, read_batch
        self.ttl_ms = int(ttl_s * 1000)
        self.timeout_s, self.backoff_s, self.clock = timeout_s, backoff_s, clock
        self.gateway = secrets.token_hex(6)
        self.pending: deque[Assignment] = deque(maxlen=max_pending)
        self.cursor = b"0-0"
        self.stats: dict[str, int] = dict.fromkeys(("published", "merged", "redis_errors"), 0)
        self._client: redis.Redis | None = None
        self._pid = -1
        self._down_until = 0.0

    def record(self, model: str, block: str, backend: str) -> None:
        """Note one routing decision (request path: memory only)."""
        self.pending.append(Assignment(model, block, backend))

    def share(self, blocks: Sequence[int], backend: str) -> None:
        """Note that ``backend`` was sent a prompt holding ``blocks`` (the ones the deciding host
        did not know yet; at most ``MAX_SHARED_BLOCKS`` leading ones): one assignment whose
        ``block`` is the chain of block hashes. The model is in every block's hash (its seed,
        ntonix/core/prompt.py), so ``model`` stays empty."""
        if blocks:
            self.record("", ",".join(map(str, blocks[:MAX_SHARED_BLOCKS])), backend)

    def sync(self) -> list[Assignment]:
        """Publish the batch, return the other gateways' assignments since the last call."""
        client = self._ready()
        if client is None:
            return []
        batch = list(self.pending)
        try:
            if batch:
                pipe = client.pipeline(transaction=False)
                pipe.xadd(self.stream, {b"g": self.gateway, b"a": orjson.dumps([tuple(x) for x in batch])},
                          maxlen=self.max_entries, approximate=True)
                pipe.pexpire(self.stream, self.ttl_ms)
                pipe.execute()
                for _ in batch:
                    # Only now: what was recorded meanwhile stays (if the deque overflowed
                    # meanwhile, a few new ones go instead: bounded, and the next ones come).
                    self.pending.popleft()
                self.stats["published"] += len(batch)
            merged = self._read(client)
        except ERRORS as exc:
            self._failed(exc)
            return []
        self.stats["merged"] += len(merged)
        return merged

    @staticmethod
    def merger(record: Callable[[list[int], str], None]) -> Callable[[list[Assignment]], None]:
        """The ``merge`` callback for :meth:`run` that feeds the blocks of each shared assignment
        to ``record(blocks, backend)`` (the host's index, ntonix/routing/state.py ``merge``)."""
        def merge(got: list[Assignment]) -> None:
            for a in got:
                try:
                    blocks = [int(x) for x in a.block.split(",")]
                except ValueError:
                    continue  # another version's entry
                record(blocks, a.backend)
        return merge

    def run(self, merge: Callable[[list[Assignment]], None], interval_s: float,
            sleep: Callable[[float], object], stopped: Callable[[], bool]) -> None:
        """The background loop: :meth:`sync` every ``interval_s``, hand what came to ``merge``."""
        while not stopped():
            got = self.sync()
            if got:
                merge(got)
            sleep(interval_s)

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None

    def _read(self, client: redis.Redis) -> list[Assignment]:
        out: list[Assignment] = []
        for _ in range(max(1, self.max_entries // self.read_batch)):  # bounded catch-up per sync
            reply: Any = client.xread({self.stream: self.cursor}, count=self.read_batch)
            entries = [e for _name, es in reply or () for e in es]
            for entry_id, fields in entries:
                self.cursor = entry_id
                if fields.get(b"g") == self.gateway.encode():
                    continue
                try:
                    rows = orjson.loads(fields.get(b"a", b"[]"))
                    out.extend(Assignment(str(m), str(b), str(be)) for m, b, be in rows)
                except (orjson.JSONDecodeError, TypeError, ValueError):
                    continue  # another version's entry: skip it
            if len(entries) < self.read_batch:
                break
        return out

    def _ready(self) -> redis.Redis | None:
        if self.clock() < self._down_until:
            return None
        if self._client is None or self._pid != os.getpid():
            try:
                self._client = redis_py(self.url, self.timeout_s)
            except (redis.RedisError, ValueError) as exc:
                self._failed(exc)
                return None
            self._pid = os.getpid()
        return self._client

    def _failed(self, exc: BaseException) -> None:
        if self.clock() >= self._down_until:
            log.warning("cluster.affinity_unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
        self.stats["redis_errors"] += 1
        self._down_until = self.clock() + self.backoff_s

    def __repr__(self) -> str:
        return (f"<AffinityBoard {self.gateway} pending={len(self.pending)} cursor={self.cursor.decode()} "
                f"{'backing-off' if self.clock() < self._down_until else 'ok'}>")
