"""The handshake between an unregistered leader and requests on other workers (issue #14).

Two workers are simulated in one process: each has its own coalescer (its own board map,
lock descriptors and pid), and ``Process.pid`` is switched while one of them acts. The
follower's polling ``sleep`` runs the leader's scripted steps, with a fake clock: no threads,
no real sleeps. Invariant under test (ntonix/cache/coalescer.py, "The handshake"): a request
that raised ``want`` on a leader's slot either takes a seat in the flight that leader
registered, from its first record, whatever the outcome (200, error, client gone), or the
leader had left the board before the want, registering nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ntonix.cache import lmdb_env
from ntonix.cache.board import ENDING, REGISTERED, RUNNING
from ntonix.cache.coalescer import RESERVE_S, Coalescer, Follower, Leader, key_hash
from ntonix.cache.lmdb_env import Process
from tests.fakes import FakeClock

HEAD = (("Content-Type", "application/json"),)
A, B = 4001, 4002  # the two workers' pids


class Workers:
    """Two workers' coalescers on one directory; ``as_(pid)`` makes one of them the caller."""

    def __init__(self, directory: Path, clock: FakeClock) -> None:
        self.clock = clock
        self.alive = {A, B}
        self.steps: list[Callable[[], object]] = []
        self.sleeps = 0
        self.c = {pid: Coalescer(str(directory), stale_after_s=30, sleep=self.sleep, clock=clock,
                                 is_alive=self.alive.__contains__, lazy=True) for pid in (A, B)}

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.clock.advance(seconds)
        if self.steps:
            self.steps.pop(0)()

    @contextmanager
    def as_(self, pid: int) -> Iterator[Coalescer]:
        saved = Process.pid
        self._switch(pid)
        try:
            yield self.c[pid]
        finally:
            self._switch(saved)

    @staticmethod
    def _switch(pid: int) -> None:
        # One LMDB environment per path and process (lmdb_env.open_env): both simulated
        # workers share it, as threads of one process would.
        Process.pid = pid
        for path, (_, env) in list(lmdb_env._envs.items()):
            lmdb_env._envs[path] = (pid, env)

    def run(self, pid: int, fn: Callable[..., Any], *args: Any) -> Any:
        with self.as_(pid):
            return fn(*args)

    def later(self, pid: int, fn: Callable[..., Any], *args: Any) -> None:
        """A step the other worker takes while the caller polls."""
        self.steps.append(lambda: self.run(pid, fn, *args))

    def slot(self, key: str = "k") -> Any:
        with self.as_(A) as c:
            return c.board().peek(key_hash(key))

    def rows(self) -> tuple[int, int, int]:
        with self.as_(A) as c:
            h = c.handles()
            with h.env.begin() as txn:
                return tuple(txn.stat(db)["entries"] for db in (h.inflight, h.flights, h.journal))  # type: ignore[return-value]


@pytest.fixture
def w(tmp_path: Path) -> Iterator[Workers]:
    saved = Process.pid
    workers = Workers(tmp_path, FakeClock(1_700_000_000.0))
    yield workers
    Workers._switch(saved)


def lead(w: Workers, pid: int, key: str = "k") -> Leader:
    role = w.run(pid, w.c[pid].join, key)
    assert isinstance(role, Leader) and role.lazy
    return role


def answer(leader: Leader, status: int, *chunks: bytes, ok: bool = True) -> None:
    leader.publish_head(status, HEAD)
    for chunk in chunks:
        leader.publish_chunk(chunk)
    leader.finish(ok)


def read_all(w: Workers, pid: int, follower: Follower) -> tuple[Any, bytes]:
    with w.as_(pid):
        head = follower.wait_head(5)
        body = b"".join(follower.chunks(5)) if head is not None else b""
        follower.close()
    return head, body


def test_a_fast_error_reaches_a_follower_that_wanted_it_and_no_later_request(w: Workers) -> None:
    leader = lead(w, A)
    # B finds A's slot and raises want; before A's worker looks at its bell, the backend's
    # error comes and the answer ends (the flake of test_coalescing's failing-leader test).
    w.later(A, answer, leader, 503, b'{"error": "busy"}')
    follower = w.run(B, w.c[B].join, "k")
    assert isinstance(follower, Follower)
    assert read_all(w, B, follower) == ((503, HEAD), b'{"error": "busy"}')
    assert w.slot() is None
    # A request arriving after the error leads: it is never handed the old answer.
    assert lead(w, B).lazy


def test_a_fast_complete_answer_reaches_a_follower_that_wanted_it(w: Workers) -> None:
    leader = lead(w, A)
    w.later(A, answer, leader, 200, b"part 1 ", b"part 2")
    follower = w.run(B, w.c[B].join, "k")
    assert isinstance(follower, Follower)
    assert read_all(w, B, follower) == ((200, HEAD), b"part 1 part 2")
    assert w.rows() == (0, 1, 3)  # kept for others who wanted it, until the sweep
    w.clock.advance(RESERVE_S + 1)
    with w.as_(B) as c:
        assert c.sweep() == 1
    assert w.rows() == (0, 0, 0)


def test_a_want_raised_after_the_leader_left_goes_alone_at_once(w: Workers) -> None:
    leader = lead(w, A)
    seen = w.slot()
    assert seen is not None and seen.state == RUNNING
    w.run(A, answer, leader, 200, b"{}")  # the leader's end came first: nobody wanted it
    assert w.slot() is None and w.rows() == (0, 0, 0)
    with w.as_(B) as c:
        # B read the slot before the leader left and raises want after: it sees the leader
        # gone, and no flight was registered for it.
        assert c._await_leader(c.board(), key_hash("k"), seen) is None
    assert w.sleeps == 0


def test_a_follower_waits_while_the_leader_is_deciding(w: Workers) -> None:
    leader = lead(w, A)
    h = key_hash("k")
    w.run(A, lambda: w.c[A].board().set_state(h, A, leader.serial, ENDING))
    # ENDING for two polls (the leader left the board with a want and is registering), then it
    # has registered and cleared the slot.
    w.later(A, lambda: None)
    w.later(A, lambda: (w.c[A].board().set_state(h, A, leader.serial, RUNNING), answer(leader, 200, b"{}")))
    follower = w.run(B, w.c[B].join, "k")
    assert isinstance(follower, Follower) and w.sleeps == 2
    assert read_all(w, B, follower) == ((200, HEAD), b"{}")


def test_the_leaders_worker_registers_on_its_bell_and_the_follower_streams_along(w: Workers) -> None:
    leader = lead(w, A)
    w.run(A, leader.publish_head, 200, HEAD)
    w.run(A, leader.publish_chunk, b"early ")
    w.later(A, w.c[A].register_wanted)  # A's tick saw its bell
    follower = w.run(B, w.c[B].join, "k")
    assert isinstance(follower, Follower)
    seen = w.slot()
    assert seen is not None and seen.state == REGISTERED
    # A third request, on either worker, joins the registered flight through the journal.
    third = w.run(A, w.c[A].join, "k")
    assert isinstance(third, Follower)
    w.run(A, leader.publish_chunk, b"late")
    w.run(A, leader.finish, True)
    assert read_all(w, B, follower) == ((200, HEAD), b"early late")
    assert read_all(w, A, third) == ((200, HEAD), b"early late")
    assert w.slot() is None


def test_a_leader_whose_client_left_reads_on_for_a_follower_that_wanted_it(w: Workers) -> None:
    leader = lead(w, A)
    w.run(A, leader.publish_head, 200, HEAD)
    w.run(A, leader.publish_chunk, b"a")

    def client_gone() -> None:
        # What the proxy's body does when its client leaves: carry on only for followers.
        assert leader.has_followers
        leader.publish_chunk(b"b")
        leader.finish(True)

    w.later(A, client_gone)
    follower = w.run(B, w.c[B].join, "k")
    assert isinstance(follower, Follower)
    assert read_all(w, B, follower) == ((200, HEAD), b"ab")


def test_without_a_want_the_leaders_client_leaving_ends_the_flight(w: Workers) -> None:
    leader = lead(w, A)
    with w.as_(A):
        leader.publish_head(200, HEAD)
        assert not leader.has_followers
        leader.finish(False)
    assert w.slot() is None and w.rows() == (0, 0, 0)


def test_an_answer_up_to_the_unregistered_bound_is_journaled_for_a_follower(w: Workers) -> None:
    """The leader's worker did not look at its bell before the answer ended: what it kept
    (everything, up to cache.max_entry_bytes) goes into the journal for the waiting request."""
    for c in w.c.values():
        c.max_bytes = 7
    leader = lead(w, A)
    w.later(A, answer, leader, 200, b"12", b"345", b"67")
    follower = w.run(B, w.c[B].join, "k")
    assert isinstance(follower, Follower)
    assert read_all(w, B, follower) == ((200, HEAD), b"1234567")


def test_an_unregistered_leader_is_joinable_up_to_the_entry_bound(w: Workers) -> None:
    """An answer the cache will store keeps its leader on the board to its end, however large;
    past cache.max_entry_bytes (never stored) nobody may join any more."""
    for c in w.c.values():
        c.max_bytes = 4
    leader = lead(w, A)
    with w.as_(A):
        leader.publish_head(200, HEAD)
        leader.publish_chunk(b"1234")
    assert w.slot() is not None and leader.solo_on_board  # at the bound: still joinable
    with w.as_(A):
        leader.publish_chunk(b"5")
    assert w.slot() is None and not leader.solo_on_board  # past it: off the board
    with w.as_(A):
        leader.finish(True)


def test_a_dead_leaders_slot_is_not_waited_for(w: Workers) -> None:
    lead(w, A)
    w.alive.discard(A)  # killed: its slot stays on the board
    assert lead(w, B).lazy and w.sleeps == 0


def test_a_leader_that_fails_after_a_want_lets_the_follower_lead(w: Workers) -> None:
    leader = lead(w, A)
    w.later(A, lambda: answer(leader, 200, b"{", ok=False))  # e.g. the backend broke off
    role = w.run(B, w.c[B].join, "k")
    assert isinstance(role, Leader) and role.lazy  # nothing to share: B goes to a backend


def test_the_leaders_tick_sweeps_a_reserved_flight_once_no_seat_can_come(w: Workers) -> None:
    import gevent

    leader = lead(w, A)
    w.later(A, answer, leader, 200, b"{}")
    follower = w.run(B, w.c[B].join, "k")
    assert isinstance(follower, Follower)
    read_all(w, B, follower)
    assert w.rows() == (0, 1, 2)
    other = lead(w, A, "other")  # the tick runs while the worker leads something
    w.clock.advance(RESERVE_S / 2)
    w.run(A, w.c[A].tick)
    gevent.sleep(0)
    assert w.rows() == (0, 1, 2)  # a request that wanted it may still take its seat
    w.clock.advance(RESERVE_S)
    with w.as_(A):
        w.c[A].tick()
        gevent.sleep(0)  # the sweep runs in a greenlet (the tick runs in the hub)
    assert w.rows() == (0, 0, 0)
    w.run(A, other.finish, False)
