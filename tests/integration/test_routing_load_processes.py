"""ntonix.routing.load across real processes: 4 gevent processes share one file.

Each process runs many greenlets that take a place on one backend limited to ``LIMIT`` (10 x the
limit of clients or more), hold it a few milliseconds and give it back, over and over; a
greenlet that finds no room waits in the host-wide first-come-first-served queue. Every process
keeps reading the host-wide count while it runs; reads are slowed down (see ``SlowReads``) so that
a check-and-increment that is not atomic across processes would show. The limit must hold exactly (never exceeded,
and reached), every waiter must be admitted in ticket order, and nobody times out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ntonix.routing.load import HostLoad

ROOT = Path(__file__).resolve().parents[2]
PROCESSES, GREENLETS, ROUNDS, LIMIT = 4, 25, 40, 10

CHILD = r"""
import json, os, random, sys, time
from gevent import monkey; monkey.patch_all()
import gevent
from ntonix.routing.load import HostLoad

path, go, mode = sys.argv[1], sys.argv[2], sys.argv[6]
greenlets, rounds, limit = (int(a) for a in sys.argv[3:6])


class SlowReads(HostLoad):
    # Inside begin and try_admit a read of the count takes 50 µs here (a spin: no greenlet
    # switch), so that an increment that was not atomic with its check across processes would
    # be caught, not hidden by a window of a microsecond.
    slow = False

    def _sum(self, base, col):
        value = super()._sum(base, col)
        end = time.perf_counter() + (50e-6 if self.slow else 0)
        while time.perf_counter() < end:
            pass
        return value

    def begin(self, address, limit=0):
        self.slow = True
        try:
            return super().begin(address, limit)
        finally:
            self.slow = False

    def try_admit(self, waiter, pick=None):
        self.slow = True
        try:
            return super().try_admit(waiter, pick)
        finally:
            self.slow = False


load = SlowReads(path, sleep=gevent.sleep, poll_s=0.001)
rng = random.Random(os.getpid())
admissions, seen, timeouts, fast = [], [0], [0], [0]

def check():
    n = load.in_flight("a:1")
    seen[0] = max(seen[0], n)

def client():
    for _ in range(rounds):
        if mode == "try":  # no queue: try again and again, so that many begin() race each other
            while not load.begin("a:1", limit):
                gevent.sleep(0)
            fast[0] += 1
        elif load.begin("a:1", limit):
            fast[0] += 1
        else:
            waiter = load.enqueue({"a:1": limit}, timeout_s=60)
            try:
                while load.try_admit(waiter) is None:
                    if time.monotonic() > waiter.deadline:
                        timeouts[0] += 1
                        break
                    gevent.sleep(0.001)
                else:
                    admissions.append((waiter.ticket, waiter.admitted_as))
            finally:
                load.cancel(waiter)
            if waiter.admitted_as == 0:
                continue
        check()
        gevent.sleep(rng.choice((0, 0, 0.001)))
        check()
        load.end("a:1")

def watcher(stop):
    while not stop:
        check()
        gevent.sleep(0.0005)

deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.001)
stop = []
w = gevent.spawn(watcher, stop)
gevent.joinall([gevent.spawn(client) for _ in range(greenlets)])
stop.append(1)
w.join()
print(json.dumps({"admissions": admissions, "max_seen": seen[0], "timeouts": timeouts[0], "fast": fast[0]}))
load.close()
"""


def run(tmp_path: Path, mode: str) -> list[dict[str, Any]]:
    path, go = tmp_path / "load", tmp_path / "go"
    args = [str(path), str(go), str(GREENLETS), str(ROUNDS), str(LIMIT), mode]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
    try:
        go.write_text("go")
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outs.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def test_max_in_flight_holds_exactly_when_many_race_for_a_place(tmp_path: Path) -> None:
    outs = run(tmp_path, "try")
    assert max(o["max_seen"] for o in outs) == LIMIT  # reached, never exceeded
    assert sum(o["fast"] for o in outs) == PROCESSES * GREENLETS * ROUNDS
    after = HostLoad(str(tmp_path / "load"), pid=1)  # every child gave its places back and its slot up
    assert after.in_flight("a:1") == 0
    after.close()


def test_max_in_flight_holds_exactly_and_waiters_go_in_ticket_order(tmp_path: Path) -> None:
    outs = run(tmp_path, "queue")
    assert all(o["timeouts"] == 0 for o in outs)
    assert max(o["max_seen"] for o in outs) == LIMIT  # reached, never exceeded
    served = sum(o["fast"] + len(o["admissions"]) for o in outs)
    assert served == PROCESSES * GREENLETS * ROUNDS
    admissions = sorted(a for o in outs for a in o["admissions"])  # by ticket
    assert len(admissions) > PROCESSES * GREENLETS  # most requests had to queue
    numbers = [n for _, n in admissions]
    assert numbers == sorted(numbers), "waiters were admitted out of ticket order"
    assert numbers == list(range(1, len(numbers) + 1))
