from __future__ import annotations

import pytest

from ntonix.core.breaker import (
    TRANSITIONS,
    BreakerEvent,
    BreakerState,
    CircuitBreaker,
    IllegalTransition,
    Transition,
    next_state,
)
from tests.fakes import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN




def make(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown, clock=clock), clock


def tripped(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, FakeClock]:
    b, clock = make(threshold, cooldown)
    for _ in range(threshold):
        b.record_failure("boom")
    assert b.state is OPEN
    return b, clock


def half_open() -> tuple[CircuitBreaker, FakeClock]:
    b, clock = tripped()
    clock.advance(10)
    assert b.acquire()[0]
    assert b.state is HALF_OPEN
    return b, clock


# --- the table -------------------------------------------------------------------------------


def test_state_values() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]


def test_table_is_the_documented_machine() -> None:
    assert TRANSITIONS == {
        (CLOSED, BreakerEvent.TRIP): OPEN,
        (OPEN, BreakerEvent.COOLDOWN_ELAPSED): HALF_OPEN,
        (HALF_OPEN, BreakerEvent.TRIAL_SUCCEEDED): CLOSED,
        (HALF_OPEN, BreakerEvent.TRIAL_FAILED): OPEN,
        (OPEN, BreakerEvent.RECOVERED): CLOSED,
        (HALF_OPEN, BreakerEvent.RECOVERED): CLOSED,
    }


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in BreakerState for e in BreakerEvent if (s, e) not in TRANSITIONS],
)
def test_illegal_events_raise(state: BreakerState, event: BreakerEvent) -> None:
    with pytest.raises(IllegalTransition) as info:
        next_state(state, event)
    assert info.value.state is state
    assert info.value.event is event
    assert event.name in str(info.value)
    assert state.name in str(info.value)


def test_every_state_has_an_illegal_event() -> None:
    # Sanity check of the parametrisation above: 15 pairs, 6 legal, 9 illegal.
    assert len([1 for s in BreakerState for e in BreakerEvent if (s, e) not in TRANSITIONS]) == 9


# --- CLOSED ----------------------------------------------------------------------------------


def test_starts_closed_and_lets_everything_through() -> None:
    b, _ = make()
    assert b.state is CLOSED
    assert b.failures == 0
    assert b.available()
    assert [b.acquire() for _ in range(5)] == [(True, None)] * 5


def test_trips_at_threshold_of_consecutive_failures() -> None:
    b, _ = make(threshold=3)
    assert b.record_failure("timeout") is None
    assert b.record_failure("timeout") is None
    assert b.failures == 2
    assert b.state is CLOSED
    t = b.record_failure("connection refused")
    assert t == Transition(CLOSED, OPEN, "3 consecutive failures, last: connection refused")
    assert b.state is OPEN
    assert b.failures == 3


def test_success_resets_the_failure_count() -> None:
    b, _ = make(threshold=3)
    b.record_failure("x")
    b.record_failure("x")
    assert b.record_success() is None
    assert b.failures == 0
    b.record_failure("x")
    b.record_failure("x")
    assert b.state is CLOSED


def test_threshold_one_trips_on_first_failure() -> None:
    b, _ = make(threshold=1)
    t = b.record_failure("502")
    assert t is not None
    assert t.new is OPEN


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (-1, 1.0), (1, -0.5)])
def test_invalid_settings(threshold: int, cooldown: float) -> None:
    with pytest.raises(ValueError, match="must be >= "):
        CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown)


def test_default_clock_is_monotonic() -> None:
    b = CircuitBreaker(failure_threshold=1, cooldown_s=3600)
    b.record_failure("x")
    assert not b.available()


# --- OPEN ------------------------------------------------------------------------------------


def test_open_refuses_until_cooldown_elapsed() -> None:
    b, clock = tripped(cooldown=10)
    assert not b.available()
    assert b.acquire() == (False, None)
    clock.advance(9.9)
    assert not b.available()
    assert b.acquire() == (False, None)
    assert b.state is OPEN


def test_available_is_a_pure_query() -> None:
    b, clock = tripped(cooldown=10)
    clock.advance(10)
    assert b.available()
    assert b.available()
    assert b.state is OPEN


def test_late_verdicts_in_open_are_ignored() -> None:
    b, clock = tripped(cooldown=10)
    clock.advance(5)
    assert b.record_success() is None
    assert b.record_failure("late") is None
    b.release()
    assert b.state is OPEN
    assert b.failures == 3
    clock.advance(5)  # the cooldown was not restarted by the late failure
    assert b.available()


def test_cooldown_elapsed_goes_half_open_and_takes_the_trial() -> None:
    b, clock = tripped(cooldown=10)
    clock.advance(10)
    allowed, t = b.acquire()
    assert allowed
    assert t == Transition(OPEN, HALF_OPEN, "cooldown of 10s elapsed")
    assert b.state is HALF_OPEN


def test_zero_cooldown_allows_a_trial_at_once() -> None:
    b, _ = tripped(cooldown=0)
    assert b.available()
    assert b.acquire()[0]


# --- HALF_OPEN -------------------------------------------------------------------------------


def test_half_open_allows_a_single_trial() -> None:
    b, _ = half_open()
    assert not b.available()
    assert b.acquire() == (False, None)
    assert b.acquire() == (False, None)


def test_trial_success_closes() -> None:
    b, _ = half_open()
    t = b.record_success()
    assert t == Transition(HALF_OPEN, CLOSED, "trial request succeeded")
    assert b.state is CLOSED
    assert b.failures == 0
    assert b.available()
    assert b.acquire() == (True, None)


def test_trial_failure_reopens_and_restarts_cooldown() -> None:
    b, clock = half_open()
    clock.advance(3)
    t = b.record_failure("status 502")
    assert t == Transition(HALF_OPEN, OPEN, "trial request failed: status 502")
    assert b.state is OPEN
    clock.advance(9.9)
    assert not b.available()
    clock.advance(0.1)
    allowed, t2 = b.acquire()
    assert allowed
    assert t2 is not None
    assert t2.new is HALF_OPEN


def test_release_frees_the_trial_slot() -> None:
    b, _ = half_open()
    b.release()
    assert b.state is HALF_OPEN
    assert b.available()
    assert b.acquire() == (True, None)  # the new trial, no state change
    assert b.acquire() == (False, None)


def test_release_outside_half_open_is_harmless() -> None:
    b, _ = make()
    b.release()
    assert b.state is CLOSED
    assert b.acquire() == (True, None)


def test_after_closing_failures_count_from_zero() -> None:
    b, _ = half_open()
    b.record_success()
    b.record_failure("x")
    b.record_failure("x")
    assert b.state is CLOSED
    assert b.record_failure("x") is not None


def test_full_cycle() -> None:
    b, clock = make(threshold=2, cooldown=5)
    seen: list[tuple[BreakerState, BreakerState]] = []

    def note(t: Transition[BreakerState] | None) -> None:
        if t is not None:
            seen.append((t.old, t.new))

    note(b.record_failure("a"))
    note(b.record_failure("b"))
    clock.advance(5)
    note(b.acquire()[1])
    note(b.record_failure("c"))
    clock.advance(5)
    note(b.acquire()[1])
    note(b.record_success())
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


# --- repr ------------------------------------------------------------------------------------


def test_repr_shows_state() -> None:
    b, clock = make(threshold=5, cooldown=30)
    assert repr(b) == "<CircuitBreaker CLOSED fails=0>"
    for _ in range(5):
        b.record_failure("x")
    clock.advance(17.7)
    assert repr(b) == "<CircuitBreaker OPEN fails=5 reopen_in=12.3s>"
    clock.advance(100)
    assert repr(b) == "<CircuitBreaker OPEN fails=5 reopen_in=0.0s>"
    b.acquire()
    assert repr(b) == "<CircuitBreaker HALF_OPEN fails=5 trial=busy>"
    b.release()
    assert repr(b) == "<CircuitBreaker HALF_OPEN fails=5 trial=free>"


def test_recovered_closes_open_and_half_open_breakers() -> None:
    clock = FakeClock()
    b = CircuitBreaker(1, 10.0, clock=clock)
    b.record_failure("boom")
    t = b.recovered("health checks passed")
    assert t is not None and (t.old, t.new) == (BreakerState.OPEN, BreakerState.CLOSED)
    assert b.available() and b.failures == 0
    b.record_failure("boom")
    clock.advance(10.0)
    assert b.acquire()[0] and b.state is BreakerState.HALF_OPEN
    t = b.recovered("health checks passed")
    assert t is not None and t.new is BreakerState.CLOSED
    assert b.recovered("again") is None
