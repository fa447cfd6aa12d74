"""ntonix.routing.load in one process: several worker handles on one shared file, a fake clock.

Two ``HostLoad`` objects with different (fake) pids stand for two worker processes; the
multiprocess test (tests/integration/test_routing_load_processes.py) runs real ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ntonix.routing.load import HostLoad, LimitFull, NamesFull
from tests.fakes import FakeClock


class World:
    def __init__(self, path: Path) -> None:
        self.path = str(path / "load")
        self.clock = FakeClock()
        self.live: set[int] = set()

    def worker(self, pid: int, **kw: object) -> HostLoad:
        self.live.add(pid)
        return HostLoad(self.path, clock=self.clock, sleep=self.clock.advance, poll_s=0.01, pid=pid,
                        alive=self.live.__contains__, slots=8, backends=8, **kw)  # type: ignore[arg-type]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_counts_are_summed_over_workers(world: World) -> None:
    w1, w2 = world.worker(101), world.worker(102)
    assert w1.slot != w2.slot
    assert w1.begin("a:1") and w1.begin("a:1") and w2.begin("a:1") and w2.begin("b:2")
    assert (w1.in_flight("a:1"), w2.in_flight("a:1"), w1.in_flight("b:2")) == (3, 3, 1)
    w1.end("a:1")
    assert w2.in_flight("a:1") == 2
    assert w2.snapshot() == {"a:1": (2, 0), "b:2": (1, 0)}
    assert w1.column("b:2") == w2.column("b:2")  # columns are host-wide


def test_limit_holds_over_workers(world: World) -> None:
    w1, w2 = world.worker(101), world.worker(102)
    assert w1.begin("a:1", limit=2)
    assert w2.begin("a:1", limit=2)
    assert not w1.begin("a:1", limit=2)
    assert not w2.begin("a:1", limit=2)
    w1.end("a:1")
    assert w2.begin("a:1", limit=2)
    assert w1.in_flight("a:1") == 2


def test_wait_times_out_by_the_clock(world: World) -> None:
    w1 = world.worker(101)
    assert w1.begin("a:1", limit=1)
    start = world.clock()
    assert w1.wait({"a:1": 1}, timeout_s=2.0) is None
    assert 2.0 <= world.clock() - start < 2.1
    assert w1.queued("a:1") == 0  # it left the queue


def test_waiters_are_served_first_come_first_served(world: World) -> None:
    w1, w2, w3 = world.worker(101), world.worker(102), world.worker(103)
    assert w1.begin("a:1", limit=1)
    first = w2.enqueue({"a:1": 1}, timeout_s=10)
    second = w3.enqueue({"a:1": 1}, timeout_s=10)
    third = w2.enqueue({"a:1": 1}, timeout_s=10)
    assert w1.queued("a:1") == 3
    assert w1.load_for_newcomer("a:1", 1) == 1
    w1.end("a:1")
    # room, but a newcomer may not jump the queue, and only the oldest waiter may take it
    assert not w1.begin("a:1", limit=1)
    assert w3.try_admit(second) is None
    assert w2.try_admit(third) is None
    assert w2.try_admit(first) == "a:1"
    assert first.admitted_as == 1
    assert w3.try_admit(second) is None  # full again
    w2.end("a:1")
    assert w2.try_admit(third) is None  # second is older
    assert w3.try_admit(second) == "a:1"
    w3.end("a:1")
    assert w2.try_admit(third) == "a:1"
    assert (second.admitted_as, third.admitted_as) == (2, 3)
    w2.end("a:1")
    assert w1.queued("a:1") == 0
    assert w1.begin("a:1", limit=1)  # no waiters left: newcomers go straight in


def test_a_cancelled_waiter_does_not_block_the_queue(world: World) -> None:
    w1, w2 = world.worker(101), world.worker(102)
    assert w1.begin("a:1", limit=1)
    gone = w2.enqueue({"a:1": 1}, timeout_s=10)
    stays = w1.enqueue({"a:1": 1}, timeout_s=10)
    w2.cancel(gone)
    w2.cancel(gone)  # twice is harmless
    w1.end("a:1")
    assert w1.try_admit(stays) == "a:1"


def test_a_waiter_takes_whichever_of_its_backends_frees_first(world: World) -> None:
    w1 = world.worker(101)
    assert w1.begin("a:1", limit=1) and w1.begin("b:2", limit=1)
    waiter = w1.enqueue({"a:1": 1, "b:2": 1}, timeout_s=10)
    assert w1.queued("a:1") == w1.queued("b:2") == 1
    assert w1.try_admit(waiter) is None
    w1.end("b:2")
    assert w1.try_admit(waiter, pick=lambda ready: sorted(ready)[0]) == "b:2"
    assert w1.queued("a:1") == w1.queued("b:2") == 0


def test_pick_may_decline(world: World) -> None:
    w1 = world.worker(101)
    waiter = w1.enqueue({"a:1": 1}, timeout_s=10)
    assert w1.try_admit(waiter, pick=lambda ready: None) is None
    assert w1.try_admit(waiter) == "a:1"


def test_dead_workers_are_reaped(world: World) -> None:
    w1, w2 = world.worker(101), world.worker(102)
    assert w2.begin("a:1") and w2.begin("a:1")
    w2.enqueue({"b:2": 1}, timeout_s=10)
    assert w1.in_flight("a:1") == 2
    world.live.discard(102)
    assert w1.reap() == 1
    assert w1.in_flight("a:1") == 0
    assert w1.queued("b:2") == 0
    w3 = world.worker(103)
    assert w3.slot == w2.slot  # the slot is reused


def test_a_new_worker_reclaims_dead_slots(world: World) -> None:
    workers = [world.worker(200 + i) for i in range(8)]
    with pytest.raises(LimitFull, match="worker slots"):
        world.worker(300)
    world.live.discard(204)
    assert world.worker(300).slot == workers[4].slot


def test_close_gives_the_slot_back(world: World) -> None:
    w1, w2 = world.worker(101), world.worker(102)
    assert w2.begin("a:1")
    w2.close()
    assert w1.in_flight("a:1") == 0


def test_columns_run_out(world: World) -> None:
    w1 = world.worker(101)
    for i in range(8):
        w1.column(f"h:{i}")
    with pytest.raises(NamesFull, match="backend addresses"):
        w1.column("h:99")


def test_another_layout_is_reinitialised(world: World) -> None:
    w1 = world.worker(101)
    assert w1.begin("a:1")
    w1.close()
    other = HostLoad(world.path, slots=4, backends=4, pid=101)
    assert other.in_flight("a:1") == 0
    assert "slot=0" in repr(other)


def test_a_forked_child_takes_a_slot_of_its_own(tmp_path: Path) -> None:
    import os

    load = HostLoad(str(tmp_path / "load"), slots=8, backends=8)
    assert load.begin("a:1")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its slot and the host-wide count after its own begin
        try:
            load.begin("a:1")
            os.write(write_end, f"{load.slot} {load.in_flight('a:1')}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child_slot, seen = map(int, os.read(read_end, 100).split())
    os.waitpid(pid, 0)
    os.close(read_end)
    assert child_slot != load.slot
    assert seen == 2
    assert load.in_flight("a:1") == 2  # the child died holding one: counted until reaped
    assert load.reap() == 1
    assert load.in_flight("a:1") == 1


def test_a_retargeted_waiter_keeps_its_place_in_line(world: World) -> None:
    """After a HUP the older waiter moves to a new backend's queue ahead of a younger one
    already there (its ticket, not the time it moved, orders it)."""
    w1, w2 = world.worker(101), world.worker(102)
    assert w1.begin("a:1", limit=1) and w1.begin("b:1", limit=1)
    older = w1.enqueue({"a:1": 1}, timeout_s=10)
    younger = w2.enqueue({"b:1": 1}, timeout_s=10)
    w1.retarget(older, {"b:1": 1})
    assert (w1.queued("a:1"), w1.queued("b:1")) == (0, 2)
    w1.end("b:1")
    assert w2.try_admit(younger) is None  # the older one is ahead of it on b
    assert w1.try_admit(older) == "b:1"
    assert older.limits == {"b:1": 1}
    w2.cancel(younger)
