"""Putting cross-gateway coalescing behind the host's own (ADR 0009, "Wiring").

The host's LMDB coalescer (ntonix/cache/coalescer.py) answers first; only a request that became the
host's leader asks the cluster (:func:`widen`), so Redis is never consulted for a key already
led on this host. Then:

* the cluster says "lead": :class:`Fanout` publishes the backend's answer to both the host's
  followers and the cluster's;
* the cluster says "follow": :class:`Relay` reads the other gateway's answer for this
  request and publishes it into the host's flight, so the host's followers ride along;
* Redis down ("go alone"): the host's leader as it was.

Both keep the API the proxy already uses (``publish_head``/``publish_chunk``/``finish``/
``has_followers``; ``wait_head``/``chunks``/``close``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from ntonix.cache.coalescer import Follower as LocalFollower
from ntonix.cache.coalescer import Leader as LocalLeader
from ntonix.cache.coalescer import LeaderFailed
from ntonix.cluster.flights import Leader as ClusterLeader
from ntonix.cluster.follower import Follower as ClusterFollower
from ntonix.core.cache_entry import Headers

if TYPE_CHECKING:
    from ntonix.cluster.flights import Flights


class Publisher(Protocol):
    """What the proxy needs of a leader: the host's (ntonix/cache/coalescer.py), :class:`Fanout`."""

    @property
    def has_followers(self) -> bool: ...

    @property
    def solo_on_board(self) -> bool: ...

    def publish_head(self, status: int, headers: Headers) -> None: ...

    def publish_chunk(self, data: bytes) -> None: ...

    def finish(self, ok: bool) -> None: ...

    def finish_after(self, ok: bool, defer: Callable[[Callable[[], None]], object]) -> None: ...


class Subscriber(Protocol):
    """What the proxy needs of a follower: the host's, or a :class:`Relay` of another gateway's answer."""

    def wait_head(self, timeout_s: float) -> tuple[int, Headers] | None: ...

    def chunks(self, timeout_s: float) -> Iterator[bytes]: ...

    def close(self) -> None: ...


def widen(role: LocalLeader | LocalFollower, flights: Flights | None, key: str,
          cache_key: str | None = None) -> LocalLeader | LocalFollower | Fanout | Relay | bytes:
    """The role for ``key`` across gateways, given the role on this host.

    With ``cache_key`` (the Redis cache tier's key for the answer, ntonix/cache/remote.py), the
    same round trip first reads that entry: its raw value comes back instead of a role when it
    exists (the caller then finishes the host's leader and replays it).
    """
    if flights is None or not isinstance(role, LocalLeader):
        return role  # following a flight of this host: no need to ask Redis
    remote = flights.join_or_hit(key, cache_key)
    if isinstance(remote, bytes):
        return remote
    if isinstance(remote, ClusterFollower):
        return Relay(remote, role)
    if remote.value is None:
        return role  # Redis unavailable: this gateway goes on alone
    return Fanout(role, remote)


class Fanout:
    """The leader of both the host's flight and the cluster's."""

    def __init__(self, local: LocalLeader, cluster: ClusterLeader) -> None:
        self.local, self.cluster = local, cluster

    @property
    def has_followers(self) -> bool:
        return self.local.has_followers or self.cluster.has_followers

    @property
    def finished(self) -> bool:
        return self.local.finished and self.cluster.finished

    @property
    def solo_on_board(self) -> bool:
        """The host's flight is only on the board (ntonix/cache/coalescer.py): its L2 write may
        wait, as long as the host's flight ends after it (:meth:`finish_after`; the other
        gateways read Redis, whose copy goes with the cluster's end)."""
        return self.local.solo_on_board

    def publish_head(self, status: int, headers: Headers) -> None:
        self.local.publish_head(status, headers)
        self.cluster.publish_head(status, headers)

    def publish_chunk(self, data: bytes) -> None:
        self.local.publish_chunk(data)
        self.cluster.publish_chunk(data)

    def finish(self, ok: bool) -> None:
        self.local.finish(ok)
        self.cluster.finish(ok)

    def finish_after(self, ok: bool, defer: Callable[[Callable[[], None]], object]) -> None:
        """The host's flight ends from ``defer``'s callback (after the batched L2 write); the
        cluster's ends now, in this greenlet: its end may wait on Redis, which a loop callback
        may not. The other gateways read Redis, whose copy goes with the cluster's end."""
        self.cluster.finish(ok)
        self.local.finish_after(ok, defer)

    def close(self) -> None:
        self.finish(False)

    def __repr__(self) -> str:
        return f"<Fanout {self.local!r} {self.cluster!r}>"


class Relay:
    """Follows another gateway's answer and republishes it to this host's followers.

    ``close()`` always settles the host's flight: complete only if the whole answer came, so a
    request that found the other gateway's leader gone (``wait_head`` -> ``None``) joins again
    from scratch, and the host's followers never receive a truncated answer as complete.
    """

    def __init__(self, remote: ClusterFollower, local: LocalLeader) -> None:
        self.remote, self.local = remote, local
        self._complete = False
        self._timeout_s = 0.0  # of the last chunks() call
        self.closed = False

    def wait_head(self, timeout_s: float) -> tuple[int, Headers] | None:
        head = self.remote.wait_head(timeout_s)
        if head is not None:
            self.local.publish_head(*head)
        return head

    def chunks(self, timeout_s: float) -> Iterator[bytes]:
        self._timeout_s = timeout_s
        try:
            for chunk in self.remote.chunks(timeout_s):
                self.local.publish_chunk(chunk)
                yield chunk
        except LeaderFailed:
            self.local.finish(False)
            raise
        self._complete = True
        self.local.finish(True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self._complete and self._timeout_s and self.local.has_followers:
            # Our own request ended before the answer did (its client left, or had every byte
            # of a sized answer and hung up before the other gateway's end marker came), but
            # this host's followers read it through us: take the rest for them, as a leader
            # of this host finishes its answer for its followers (nothing is sent to our client).
            try:
                for _ in self.chunks(self._timeout_s):
                    pass
            except LeaderFailed:
                pass  # chunks() ended the host's flight as failed: its followers go on alone
        self.remote.close()
        if not self._complete:
            self.local.finish(False)

    def __repr__(self) -> str:
        return f"<Relay {self.remote!r} -> {self.local!r}>"
