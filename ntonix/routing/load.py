"""Requests in flight per backend over all worker processes of a host, and ``max_in_flight`` limits.

Theory of operation
-------------------
One shared file (``ntonix.routing.shm``) in the run directory holds a matrix of counters: a
column per backend address, a row ("slot") per worker process. A worker claims a slot when it
starts (slots of dead processes are reclaimed then, and by ``reap``) and writes only its own
cells, so counting needs no lock and no system call: ``begin``/``end`` add and subtract 1 in the
worker's own cell; readers sum the column over the slots in use. A reader may see a count a
moment old — fine for balancing, not for a limit.

A limit (``backends[].max_in_flight``) must hold exactly, all workers together, so taking a
place under a limit is a check-and-increment under the backend's own byte-range lock; only
limited backends pay for it (a few µs). Releasing needs no lock: it only lowers the count.

Waiting is first come, first served across the host. A request that finds every suitable
backend full takes a ticket from a host-wide counter and registers as a waiter of each such
backend: the worker publishes, per backend, the oldest ticket among its own waiters
(``wait_head``) and how many it has (``queued``, for /metrics). A waiter may take a place on a
backend only while its ticket is the oldest of all published for it; a newcomer may not take a
place on a backend that has waiters at all. Waiters poll (``poll_s``, through the injected
``sleep`` so a gevent worker yields) until they get a place or ``timeout_s`` passes.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from ntonix.routing.shm import NamesFull, SharedCells

__all__ = ["HostLoad", "LimitFull", "NamesFull", "Waiter"]

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class LimitFull(Exception):
    """Every worker slot of the shared file is taken by a live process."""


@dataclass
class Waiter:
    """One request waiting for a place on any of ``limits`` (address -> max_in_flight)."""

    ticket: int
    limits: Mapping[str, int]
    deadline: float
    columns: dict[str, int] = field(default_factory=dict)
    done: bool = False
    admitted_as: int = 0  # the backend's admission number, for checking the order


def _reclaim_in_child(ref: weakref.ref[HostLoad]) -> None:
    load = ref()
    if load is not None:
        load.pid = os.getpid()
        load._local_waiters = {}  # the parent's waiters are the parent's
        load.slot = load._claim()


class HostLoad:
    """A worker's handle on the host-wide counts (one per worker process)."""

    def __init__(self, path: str, *, slots: int = 64, backends: int = 64, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep, poll_s: float = 0.005, pid: int | None = None,
                 alive: Callable[[int], bool] = _alive) -> None:
        self.slots, self.backends = slots, backends
        self._clock, self._sleep, self.poll_s = clock, sleep, poll_s
        self._alive = alive
        self.pid = os.getpid() if pid is None else pid
        s = slots
        self._pids = 2
        self._inflight = self._pids + s
        self._queued = self._inflight + backends * s
        self._heads = self._queued + backends * s
        self._admitted = self._heads + backends * s
        cells = self._admitted + backends
        self._shm = SharedCells(path, cells, names=backends, signature=(slots << 32) | backends)
        self._q = self._shm.q
        self._local_waiters: dict[int, list[Waiter]] = {}  # column -> this worker's waiters, oldest first
        self.slot = self._claim()
        if pid is None:
            # Made before gunicorn forks its workers (preload)? Each child then takes a slot of
            # its own: two processes writing one slot's cells would lose counts.
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _reclaim_in_child(ref))

    # ------------------------------------------------------------------ slots and columns

    def _c(self, index: int) -> int:
        return self._shm.cell(index)

    def _claim(self) -> int:
        with self._shm.lock(0):
            self._reap_locked()
            high = self._q[self._c(1)]
            for slot in range(self.slots):
                if self._q[self._c(self._pids + slot)] == 0:
                    self._clear_slot(slot)
                    self._q[self._c(self._pids + slot)] = self.pid
                    self._q[self._c(1)] = max(high, slot + 1)
                    return slot
        raise LimitFull(f"all {self.slots} worker slots of {self._shm.path} are taken by live processes")

    def _clear_slot(self, slot: int) -> None:
        for base in (self._inflight, self._queued, self._heads):
            for col in range(self.backends):
                self._q[self._c(base + col * self.slots + slot)] = 0

    def _reap_locked(self) -> int:
        reaped = 0
        for slot in range(self._q[self._c(1)]):
            pid = self._q[self._c(self._pids + slot)]
            if pid and pid != self.pid and not self._alive(pid):
                self._clear_slot(slot)
                self._q[self._c(self._pids + slot)] = 0
                reaped += 1
        return reaped

    def reap(self) -> int:
        """Free the slots of dead worker processes (their counts vanish); how many were freed."""
        with self._shm.lock(0):
            return self._reap_locked()

    def column(self, address: str) -> int:
        """The column of ``address``, assigned host-wide on first use."""
        return self._shm.number(address)

    def _sum(self, base: int, col: int) -> int:
        start = self._c(base + col * self.slots)
        return sum(self._q[start:start + self._q[self._c(1)]])

    def _own(self, base: int, col: int) -> int:
        return self._c(base + col * self.slots + self.slot)

    # ------------------------------------------------------------------ counting

    def in_flight(self, address: str) -> int:
        """Requests in flight to ``address`` from this host, all workers."""
        return self._sum(self._inflight, self.column(address))

    def queued(self, address: str) -> int:
        """Requests of this host waiting for a place on ``address``."""
        return self._sum(self._queued, self.column(address))

    def load_for_newcomer(self, address: str, limit: int) -> int:
        """In flight as a new request must see it: a backend with waiters counts as full (``limit``)."""
        col = self.column(address)
        if limit and self._has_waiters(col):
            return max(limit, self._sum(self._inflight, col))
        return self._sum(self._inflight, col)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """``{address: (in_flight, queued)}`` of every address this host has seen, for /metrics."""
        return {address: (self._sum(self._inflight, col), self._sum(self._queued, col))
                for col, address in self._shm.numbered()}

    def begin(self, address: str, limit: int = 0) -> bool:
        """Take a place on ``address`` now if it has room (``limit`` 0 = none) and no waiters."""
        col = self.column(address)
        cell = self._own(self._inflight, col)
        if not limit:
            self._q[cell] += 1
            return True
        with self._shm.lock(1 + col):
            if self._has_waiters(col) or self._sum(self._inflight, col) >= limit:
                return False
            self._q[cell] += 1
            return True

    def end(self, address: str) -> None:
        """Give the place back (exactly once per successful ``begin`` or wait)."""
        self._q[self._own(self._inflight, self.column(address))] -= 1

    def _has_waiters(self, col: int) -> bool:
        start = self._c(self._heads + col * self.slots)
        return any(self._q[start:start + self._q[self._c(1)]])

    # ------------------------------------------------------------------ waiting

    def enqueue(self, limits: Mapping[str, int], timeout_s: float) -> Waiter:
        """Join the queue of every backend in ``limits``; call ``try_admit`` until it returns, or ``cancel``."""
        columns = {address: self.column(address) for address in limits}
        # Ticket and publication under one lock: no later ticket can be published (and admitted)
        # before this one is visible.
        with self._shm.lock(0):
            ticket = self._q[self._c(0)] + 1
            self._q[self._c(0)] = ticket
            waiter = Waiter(ticket, dict(limits), self._clock() + timeout_s, columns)
            for col in columns.values():
                self._local_waiters.setdefault(col, []).append(waiter)  # tickets grow: oldest first
                self._publish(col)
        return waiter

    def _publish(self, col: int) -> None:
        local = self._local_waiters.get(col, [])
        self._q[self._own(self._queued, col)] = len(local)
        self._q[self._own(self._heads, col)] = local[0].ticket if local else 0

    def _is_oldest(self, waiter: Waiter, col: int) -> bool:
        start = self._c(self._heads + col * self.slots)
        return all(t == 0 or t >= waiter.ticket for t in self._q[start:start + self._q[self._c(1)]])

    def try_admit(self, waiter: Waiter, pick: Callable[[Collection[str]], str | None] | None = None) -> str | None:
        """A place for ``waiter`` on one of its backends whose queue it heads and that has room, or None.

        ``pick`` chooses among several such backends (the routing policy); default: the first.
        """
        ready = [a for a, col in waiter.columns.items()
                 if self._is_oldest(waiter, col) and (not waiter.limits[a]
                                                      or self._sum(self._inflight, col) < waiter.limits[a])]
        if not ready:
            return None
        address = pick(ready) if pick is not None else ready[0]
        if address is None:
            return None
        col = waiter.columns[address]
        limit = waiter.limits[address]
        with self._shm.lock(1 + col):
            if not self._is_oldest(waiter, col) or (limit and self._sum(self._inflight, col) >= limit):
                return None
            self._q[self._own(self._inflight, col)] += 1
            self._q[self._c(self._admitted + col)] += 1
            waiter.admitted_as = self._q[self._c(self._admitted + col)]
        self.cancel(waiter)
        return address

    def admitted(self, address: str) -> int:
        """How many waiters have been admitted to ``address`` (host-wide, in admission order)."""
        return self._q[self._c(self._admitted + self.column(address))]

    def cancel(self, waiter: Waiter) -> None:
        """Leave every queue the waiter is in (after admission, timeout, or the client going away)."""
        if waiter.done:
            return
        waiter.done = True
        for col in waiter.columns.values():
            local = self._local_waiters.get(col, [])
            if waiter in local:
                local.remove(waiter)
            self._publish(col)

    def retarget(self, waiter: Waiter, limits: Mapping[str, int]) -> None:
        """The waiter's backends or limits changed (a HUP, health): it keeps its ticket, so its
        place in line, and moves to the queues of ``limits``."""
        columns = {address: self.column(address) for address in limits}
        with self._shm.lock(0):
            for address, col in waiter.columns.items():
                if address not in columns:
                    local = self._local_waiters.get(col, [])
                    if waiter in local:
                        local.remove(waiter)
                    self._publish(col)
            for address, col in columns.items():
                if address not in waiter.columns:
                    local = self._local_waiters.setdefault(col, [])
                    local.append(waiter)
                    local.sort(key=lambda w: w.ticket)  # oldest first, as enqueue keeps them
                    self._publish(col)
            waiter.columns, waiter.limits = columns, dict(limits)

    def wait(self, limits: Mapping[str, int], timeout_s: float,
             pick: Callable[[Collection[str]], str | None] | None = None,
             follow: Callable[[], Mapping[str, int] | None] | None = None, follow_every: int = 10) -> str | None:
        """Wait first come, first served for a place on any of ``limits``; the address, or None on timeout.

        ``follow``, asked every ``follow_every`` polls: the limits as they are now when they
        changed (a HUP, health), else None; the waiter then moves to them in its place in line
        (:meth:`retarget`)."""
        waiter = self.enqueue(limits, timeout_s)
        try:
            polls = 0
            while True:
                address = self.try_admit(waiter, pick)
                if address is not None:
                    return address
                if self._clock() >= waiter.deadline:
                    return None
                self._sleep(self.poll_s)
                polls += 1
                if follow is not None and polls % follow_every == 0:
                    changed = follow()
                    if changed is not None:
                        self.retarget(waiter, changed)
        finally:
            self.cancel(waiter)

    def close(self) -> None:
        """Give up the slot (at worker exit): this worker's counts leave the totals."""
        with self._shm.lock(0):
            self._clear_slot(self.slot)
            self._q[self._c(self._pids + self.slot)] = 0
        self._shm.close()

    def __repr__(self) -> str:
        return f"<HostLoad slot={self.slot} pid={self.pid} backends={len(self._shm.numbered())}>"
