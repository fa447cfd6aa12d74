"""The follower side of cross-gateway coalescing (ntonix/cluster/flights.py, ADR 0009): reads a
leader's Redis stream with ``XREAD BLOCK``, and tells a leader that died from one that is slow
by its gateway process's liveness key."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson

from ntonix.cache.coalescer import LeaderFailed
from ntonix.cluster.resp import ERRORS
from ntonix.core.cache_entry import Headers

if TYPE_CHECKING:
    from ntonix.cluster.flights import Flights


class Follower:
    """A request waiting for an identical one in flight on some gateway; reads its stream."""

    def __init__(self, flights: Flights, token: str, proc: str) -> None:
        self._f = flights
        self.token, self.proc = token, proc
        self._last = b"0-0"
        self._buffer: deque[tuple[bytes, bytes]] = deque()
        self.closed = False
        self.ended = False
        flights._following += 1

    def wait_head(self, timeout_s: float) -> tuple[int, Headers] | None:
        """The leader's status and headers, or ``None`` if it failed, vanished or took longer
        than ``timeout_s`` (the caller then goes to a backend itself)."""
        try:
            kind, data = self._next(timeout_s)
        except LeaderFailed:
            return None
        if kind != b"h":
            return None
        status, headers = orjson.loads(data)
        return int(status), tuple((str(k), str(v)) for k, v in headers)

    def chunks(self, timeout_s: float) -> Iterator[bytes]:
        """The body's chunks as the leader publishes them; ends when the leader finished.

        Raises :class:`LeaderFailed` when the leader failed, vanished, Redis failed, or
        nothing new came for ``timeout_s``.
        """
        while True:
            kind, data = self._next(timeout_s)
            if kind == b"c":
                yield data
            elif kind == b"e":
                return

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._f._following -= 1

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def _next(self, timeout_s: float) -> tuple[bytes, bytes]:
        """The next stream entry; an ``e`` entry that says failed raises."""
        f = self._f
        deadline = f.clock() + timeout_s
        while not self._buffer:
            if self.ended:
                raise LeaderFailed("the answer already ended")
            block = max(1, int(min(f.block_s, deadline - f.clock()) * 1000))
            got = self._read(block)
            if got:
                continue
            if f.clock() >= deadline:
                self._failed(f"nothing from the leader for {timeout_s:g}s")
            if not self._leader_alive() and not self._read(None):
                self._failed("the leader's gateway is gone")
        kind, data = self._buffer.popleft()
        if kind == b"e":
            self.ended = True
            if data != b"1":
                self._failed("the leader's request failed")
        return kind, data

    def _read(self, block_ms: int | None) -> bool:
        f = self._f
        stream = f.prefix + "s:" + self.token
        try:
            reply: Any = f._blocking_client().xread({stream: self._last}, count=256, block=block_ms)
        except ERRORS as exc:
            f._failed(exc)
            self._failed(f"redis failed: {type(exc).__name__}")
        for _name, entries in reply or ():
            for entry_id, fields in entries:
                self._last = entry_id
                for kind, data in fields.items():
                    self._buffer.append((kind, data))
        return bool(self._buffer)

    def _leader_alive(self) -> bool:
        f = self._f
        try:
            return bool(f._client().exists(f.prefix + "a:" + self.proc))
        except ERRORS as exc:
            f._failed(exc)
            return False

    def _failed(self, why: str) -> Any:
        self._f.stats["leader_failed"] += 1
        raise LeaderFailed(why)

    def __repr__(self) -> str:
        return f"<Follower {self.token} last={self._last.decode()} {'closed' if self.closed else 'open'}>"
