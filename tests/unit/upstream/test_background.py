"""ntonix.upstream.background: the greenlets a worker's drain waits for."""

from __future__ import annotations

import gevent.event

from ntonix.upstream.background import Background


def test_join_waits_for_the_running_greenlets_only() -> None:
    background = Background()
    assert background.join(0) and len(background) == 0
    go = gevent.event.Event()
    done: list[str] = []

    def work() -> None:
        go.wait()
        done.append("x")

    background.spawn(work)
    assert len(background) == 1
    assert not background.join(0.01)  # still running: the drain keeps waiting
    go.set()
    assert background.join(1)
    assert (done, len(background)) == (["x"], 0)


def test_a_greenlet_that_fails_is_no_longer_waited_for() -> None:
    background = Background()

    def fail() -> None:
        raise ValueError("boom")

    background.spawn(fail)
    assert background.join(1)
    assert len(background) == 0
