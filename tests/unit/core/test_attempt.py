"""One attempt on a backend (ntonix.core.attempt): in flight, breaker permission, one verdict."""

from __future__ import annotations

import pytest

from ntonix.config.model import BackendConfig, CircuitBreakerConfig, HealthConfig
from ntonix.core.attempt import AlreadySettled, Attempt
from ntonix.core.breaker import BreakerState
from ntonix.core.registry import Backend, Registry
from tests.fakes import FakeClock

HEALTH = HealthConfig(unhealthy_threshold=2, healthy_threshold=1)
BREAKER = CircuitBreakerConfig(failure_threshold=2, cooldown_s=10.0)


class Releases:
    """Counts the ``on_settle`` calls (the gateway's lease release)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def backend(clock: FakeClock) -> Backend:
    return Registry([BackendConfig("10.0.0.1", 1, 1)], HEALTH, BREAKER, clock=clock).backends["10.0.0.1:1"]


def started(b: Backend, on_settle: Releases) -> Attempt:
    attempt, change = Attempt.start(b, on_settle)
    assert attempt is not None
    return attempt


def tripped(b: Backend) -> None:
    for _ in range(2):
        started(b, Releases()).failed("refused")
    assert b.breaker.state is BreakerState.OPEN


def test_a_started_attempt_counts_in_flight_until_it_succeeds() -> None:
    b, released = backend(FakeClock()), Releases()
    attempt = started(b, released)
    assert (b.in_flight, attempt.settled, released.count) == (1, False, 0)
    assert "in flight" in repr(attempt)
    assert attempt.succeeded() is None  # closed breaker: nothing to log
    assert (b.in_flight, attempt.outcome, released.count) == (0, "succeeded", 1)


def test_failures_return_the_breakers_trip_for_the_caller_to_log() -> None:
    b = backend(FakeClock())
    assert started(b, Releases()).failed("refused") is None
    trip = started(b, Releases()).failed("reset")
    assert trip is not None and (trip.old, trip.new) == (BreakerState.CLOSED, BreakerState.OPEN)
    assert "reset" in trip.reason and b.in_flight == 0


def test_an_open_breaker_refuses_the_start_and_gives_the_place_back() -> None:
    b, released = backend(FakeClock()), Releases()
    tripped(b)
    attempt, change = Attempt.start(b, released)
    assert (attempt, change, b.in_flight, released.count) == (None, None, 0, 1)


def test_the_trial_after_the_cooldown_closes_the_breaker_on_success() -> None:
    clock = FakeClock()
    b = backend(clock)
    tripped(b)
    clock.advance(10.0)
    trial, change = Attempt.start(b, Releases())
    assert trial is not None and change is not None and change.new is BreakerState.HALF_OPEN
    assert Attempt.start(b, Releases())[0] is None  # one trial at a time
    closed = trial.succeeded()
    assert closed is not None and closed.new is BreakerState.CLOSED


def test_an_abandoned_trial_frees_the_slot_without_a_verdict() -> None:
    clock = FakeClock()
    b = backend(clock)
    tripped(b)
    clock.advance(10.0)
    trial = Attempt.start(b, Releases())[0]
    assert trial is not None
    assert trial.abandoned() is None
    assert (b.breaker.state, b.breaker.failures, b.in_flight) == (BreakerState.HALF_OPEN, 2, 0)
    assert Attempt.start(b, Releases())[0] is not None  # the next request may try


def test_abandoning_a_request_from_before_the_breaker_opened_keeps_the_trial_taken() -> None:
    # The review: a request admitted while CLOSED, waiting for a free connection, gave up after
    # the breaker had opened, cooled and lent its one trial to another request: its release
    # freed that trial, and a second one went in beside it.
    clock = FakeClock()
    b = backend(clock)
    early = started(b, Releases())  # admitted while CLOSED
    tripped(b)
    clock.advance(10.0)
    trial = Attempt.start(b, Releases())[0]
    assert trial is not None and trial.trial and not early.trial
    early.abandoned()
    assert Attempt.start(b, Releases())[0] is None  # still one trial at a time


def test_an_old_trial_abandoned_late_keeps_a_later_trial_taken() -> None:
    # The second review: trial A is a long stream; the breaker reopens (a late failure of an
    # older request), cools down, and C takes a new trial; A's client then leaves: C's slot
    # must stay taken.
    clock = FakeClock()
    b = backend(clock)
    early = started(b, Releases())  # admitted while CLOSED, its verdict comes late
    tripped(b)
    clock.advance(10.0)
    a = Attempt.start(b, Releases())[0]
    assert a is not None and a.trial
    early.failed("reset")  # reopens the breaker
    assert b.breaker.state is BreakerState.OPEN
    clock.advance(10.0)
    c = Attempt.start(b, Releases())[0]
    assert c is not None and c.trial and c.trial != a.trial
    a.abandoned()
    assert Attempt.start(b, Releases())[0] is None  # C still holds the one trial
    c.abandoned()
    assert Attempt.start(b, Releases())[0] is not None  # C's own release frees it


@pytest.mark.parametrize("second", ["succeeded", "failed", "abandoned"])
def test_a_second_settle_raises_and_changes_nothing(second: str) -> None:
    b, released = backend(FakeClock()), Releases()
    attempt = started(b, released)
    attempt.failed("refused")
    with pytest.raises(AlreadySettled, match="already failed"):
        if second == "failed":
            attempt.failed("again")
        else:
            getattr(attempt, second)()
    assert (b.in_flight, b.breaker.failures, released.count, attempt.outcome) == (0, 1, 1, "failed")
