"""Choosing a backend for one request and holding its place: the policy plus the host-shared state.

``Selector.acquire`` is what the request flow calls once it knows the request's model-filtered
backends and prompt blocks:

1. read each backend's host-wide in-flight count (a backend with waiters counts as full for a
   newcomer, so nobody jumps the queue), the other gateways' last shared count (``remote``,
   a dictionary the background sync replaces; see ntonix/cluster/affinity.py) and, for
   ``prefix``, how much of the prompt it holds;
2. let the pure policy (``ntonix.core.routing``) choose;
3. take the place (``HostLoad.begin``: exact under ``max_in_flight``); another worker may have
   taken the last place in between, so a lost race chooses again, a couple of times;
4. every suitable backend at its limit: wait first come, first served up to
   ``routing.queue_timeout_s``; the policy chooses among the backends that have room when the
   turn comes;
5. for ``prefix``, record the prompt's blocks for the chosen backend, and hand the ones this
   host did not know to ``share`` (memory only: another gateway's view, synced in the
   background, ntonix/cluster/affinity.py).

For ``prefix`` the policy also gets the prompt's first block as the ``anchor`` of a cold prompt
(``ntonix.core.routing``): gateways with no shared state then agree on its backend.

The ``Lease`` gives the place back exactly once (``release``), whatever path the request ends on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ntonix.core.routing import Candidate, Outcome, Router
from ntonix.errors import BackendsBusy, NoHealthyBackend
from ntonix.routing.index import PrefixIndex
from ntonix.routing.load import HostLoad

__all__ = ["Lease", "Routable", "Selector", "Target"]

_RACES = 3  # choices retried after losing the last place to another worker


class Routable(Protocol):
    """What the selector reads of a backend (``Target``, or the registry's ``Backend`` itself)."""

    @property
    def address(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def max_in_flight(self) -> int: ...
    @property
    def routable(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Target:
    """A backend serving the request's model, as the request flow knows it."""

    address: str
    weight: int = 1
    max_in_flight: int = 0
    routable: bool = True


class Lease:
    """A place on a backend; ``release`` once the request is over (idempotent)."""

    __slots__ = ("_load", "address", "matched", "released", "waited")

    def __init__(self, load: HostLoad, address: str, matched: int, waited: bool) -> None:
        self._load = load
        self.address = address
        self.matched = matched  # prompt blocks the backend was believed to hold
        self.waited = waited
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._load.end(self.address)

    def __repr__(self) -> str:
        return f"<Lease {self.address} matched={self.matched} released={self.released}>"


class Selector:
    def __init__(self, router: Router, load: HostLoad, index: PrefixIndex | None,
                 queue_timeout_s: float, retry_after_s: int = 1) -> None:
        self.router = router
        self.load = load
        self.index = index
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        # (new blocks, backend) of each prefix decision, for the other gateways; must not block.
        self.share: Callable[[Sequence[int], str], None] | None = None
        # Requests the other gateways had in flight per backend, as last shared (replaced whole by
        # the background sync, ntonix/cluster/affinity.py; empty alone or while Redis is down).
        self.remote: Mapping[str, int] = {}

    def acquire(self, targets: Sequence[Routable], blocks: Sequence[int] = (),
                exclude: Container[str] = (), refresh: Callable[[], Sequence[Routable]] | None = None) -> Lease:
        """A place on the chosen backend; raises ``NoHealthyBackend`` or ``BackendsBusy`` (both 503).

        ``refresh``: the targets as they are now (a HUP may replace the backend list or a limit,
        health may change); a request waiting for a place follows them (``_wait``)."""
        if self.router.policy == "round_robin":
            lease = self._round_robin(targets, exclude)
            if lease is not None:
                return lease
        targets = [t for t in targets if t.address not in exclude]
        use_prefix = self.router.policy == "prefix" and bool(blocks) and self.index is not None
        matched: dict[str, int] = {}
        if use_prefix and self.index is not None:
            matched = self.index.matched(blocks, [t.address for t in targets if t.routable])
        anchor = blocks[0] if use_prefix else None
        for _ in range(_RACES):
            candidates = [self._candidate(t, matched, newcomer=True) for t in targets]
            decision = self.router.choose(candidates, anchor)
            if decision.outcome is Outcome.NONE:
                raise NoHealthyBackend("no healthy backend is available", retry_after=self.retry_after_s)
            if decision.outcome is Outcome.AT_LIMIT:
                break
            assert decision.address is not None
            limit = next(t.max_in_flight for t in targets if t.address == decision.address)
            if self.load.begin(decision.address, limit):
                return self._granted(decision.address, blocks, matched, use_prefix, waited=False)
        return self._wait(targets, blocks, matched, use_prefix, refresh, exclude)

    def _round_robin(self, targets: Sequence[Routable], exclude: Container[str]) -> Lease | None:
        """The default policy without limits, on every request: no counts read, no lock taken.
        None when a target has a ``max_in_flight`` (the counted path then decides)."""
        for t in targets:
            if t.max_in_flight:
                return None
        address = self.router.round_robin([t for t in targets if t.address not in exclude] if exclude else targets)
        if address is None:
            raise NoHealthyBackend("no healthy backend is available", retry_after=self.retry_after_s)
        self.load.begin(address)
        return Lease(self.load, address, 0, False)

    def _candidate(self, t: Routable, matched: dict[str, int], newcomer: bool) -> Candidate:
        in_flight = (self.load.load_for_newcomer(t.address, t.max_in_flight) if newcomer
                     else self.load.in_flight(t.address))
        return Candidate(t.address, t.weight, in_flight, t.max_in_flight, matched.get(t.address, 0), t.routable,
                         self.remote.get(t.address, 0))

    def _wait(self, targets: Sequence[Routable], blocks: Sequence[int], matched: dict[str, int],
              use_prefix: bool, refresh: Callable[[], Sequence[Routable]] | None = None,
              exclude: Container[str] = ()) -> Lease:
        """First come, first served for a place on any routable target, up to the queue timeout.
        The targets are looked at again every 10 polls (``refresh``): after a HUP that replaced
        the list or a limit, or a backend turning healthy or not, the request waits for the new
        ones, in the same place in line; none left routable is 503 at once."""
        anchor = blocks[0] if use_prefix else None
        routable = {t.address: t for t in targets if t.routable}
        limits = {a: t.max_in_flight for a, t in routable.items()}

        def pick(ready: Collection[str]) -> str | None:
            # The head of the queue with room on ``ready``: the policy chooses among those.
            return self.router.choose([self._candidate(routable[a], matched, newcomer=False) for a in ready],
                                      anchor).address

        def follow() -> dict[str, int] | None:
            nonlocal routable, limits
            assert refresh is not None
            now = {t.address: t for t in refresh() if t.routable and t.address not in exclude}
            if not now:
                raise NoHealthyBackend("no healthy backend is available", retry_after=self.retry_after_s)
            now_limits = {a: t.max_in_flight for a, t in now.items()}
            if now_limits == limits:
                return None
            routable, limits = now, now_limits
            return limits

        address = self.load.wait(limits, self.queue_timeout_s, pick, follow if refresh is not None else None)
        if address is None:
            raise BackendsBusy(
                f"every backend for this request is at its max_in_flight; waited {self.queue_timeout_s:g} s",
                retry_after=max(1, math.ceil(self.retry_after_s)))
        return self._granted(address, blocks, matched, use_prefix, waited=True)

    def _granted(self, address: str, blocks: Sequence[int], matched: dict[str, int], use_prefix: bool,
                 waited: bool) -> Lease:
        known = matched.get(address, 0)
        if use_prefix and self.index is not None:
            self.index.record(blocks, address, known=known)
            if self.share is not None and known < len(blocks):
                self.share(blocks[known:], address)
        return Lease(self.load, address, known, waited)
