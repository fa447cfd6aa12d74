"""The pool's pure keep-alive decisions (ntonix.core.keepalive)."""

from __future__ import annotations

import pytest

from ntonix.core.keepalive import ConnState, parse_keep_alive


@pytest.mark.parametrize(("value", "expected"), [
    ("timeout=5, max=100", (5.0, 100)),
    ("max=3", (None, 3)),
    ("timeout=2.5", (2.5, None)),
    ('Timeout="7" , MAX=1', (7.0, 1)),
    ("timeout=soon, max=many, foo=bar", (None, None)),
    ("", (None, None)),
    (None, (None, None)),
    ("max=-4, timeout=-1", (0.0, 0)),
])
def test_parse_keep_alive(value: str | None, expected: tuple[float | None, int | None]) -> None:
    assert parse_keep_alive(value) == expected


def test_a_connection_without_limits_is_always_reusable() -> None:
    state = ConnState(uses=1)
    state.answered("")
    assert state.reusable() and state.idle_ok(3600.0)


def test_max_counts_this_answer_and_the_stricter_reading_wins() -> None:
    state = ConnState(uses=1)
    state.answered("max=3")  # requests 2 and 3 may follow
    uses = [state.reusable()]
    for _ in range(3):
        state.uses += 1
        uses.append(state.reusable())
    assert uses == [True, True, False, False]


def test_max_counting_down_and_a_constant_max_both_stop_in_time() -> None:
    down, constant = ConnState(uses=1), ConnState(uses=1)
    allowed = {"down": 0, "constant": 0}
    for n in range(1, 10):
        down.answered(f"max={5 - n + 1}")  # Apache style: 5, 4, 3, ...
        constant.answered("max=5")  # cpp-httplib style: the total, every time
        allowed["down"] += down.reusable()
        allowed["constant"] += constant.reusable()
        if not (down.reusable() or constant.reusable()):
            break
        down.uses += down.reusable()
        constant.uses += constant.reusable()
    assert (down.uses, constant.uses) == (5, 5)


def test_max_one_allows_no_further_request() -> None:
    state = ConnState(uses=1)
    state.answered("timeout=5, max=1")
    assert not state.reusable()


def test_timeout_keeps_a_margin_before_the_backend_closes_an_idle_connection() -> None:
    state = ConnState(uses=1)
    state.answered("timeout=5")
    assert state.idle_ok(4.4) and not state.idle_ok(4.5)
    short = ConnState(uses=1)
    short.answered("timeout=0.5")
    assert short.idle_ok(0.2) and not short.idle_ok(0.25)
