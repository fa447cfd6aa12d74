"""Passive circuit breaker for one backend, as a table-driven state machine.

Theory of operation::

    CLOSED --TRIP (failure_threshold consecutive failures)--> OPEN
    OPEN --COOLDOWN_ELAPSED (first acquire() after cooldown_s)--> HALF_OPEN
    HALF_OPEN --TRIAL_SUCCEEDED--> CLOSED
    HALF_OPEN --TRIAL_FAILED--> OPEN (the cooldown starts again)
    OPEN | HALF_OPEN --RECOVERED (active health checks saw the backend come back)--> CLOSED

CLOSED lets every request through. OPEN lets none through until ``cooldown_s`` has passed; the
first :meth:`CircuitBreaker.acquire` after that moves to HALF_OPEN and takes the single trial
slot, so exactly one request probes the backend. Its verdict closes or reopens the breaker;
:meth:`~CircuitBreaker.release` frees the slot when the trial ended without one (client left).

Requests are concurrent, so verdicts can arrive late: a request sent while CLOSED may finish
after the breaker opened. Verdicts in OPEN are ignored (the cooldown stands); in HALF_OPEN any
success closes and any failure reopens, the trial's or not. Time comes from the injected
``clock``; nothing here sleeps, logs or does I/O — methods return the Transition, if any.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

from ntonix.core.transitions import IllegalTransition, Transition, advance

__all__ = [
    "TRANSITIONS",
    "BreakerEvent",
    "BreakerState",
    "CircuitBreaker",
    "IllegalTransition",
    "Transition",
    "next_state",
]


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerEvent(Enum):
    TRIP = "trip"
    COOLDOWN_ELAPSED = "cooldown_elapsed"
    TRIAL_SUCCEEDED = "trial_succeeded"
    TRIAL_FAILED = "trial_failed"
    RECOVERED = "recovered"


TRANSITIONS: dict[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (BreakerState.CLOSED, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.COOLDOWN_ELAPSED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.TRIAL_SUCCEEDED): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerEvent.TRIAL_FAILED): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.RECOVERED): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerEvent.RECOVERED): BreakerState.CLOSED,
}


def next_state(state: BreakerState, event: BreakerEvent) -> BreakerState:
    """The state ``event`` leads to; IllegalTransition if TRANSITIONS has no such move."""
    return advance(TRANSITIONS, state, event)


class CircuitBreaker:
    """Counts one backend's consecutive failures and decides whether it may be sent requests."""

    __slots__ = ("_clock", "_cooldown_s", "_failures", "_opened_at", "_state", "_threshold", "_trial", "_trial_id")

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold: must be >= 1, got {failure_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s: must be >= 0, got {cooldown_s}")
        self._threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False
        self._trial_id = 0  # which trial holds the slot: only its own release frees it

    @property
    def state(self) -> BreakerState:
        return self._state

    def set_thresholds(self, failure_threshold: int, cooldown_s: float) -> None:
        """New settings (a HUP): they apply to the failures counted so far and a cooldown running."""
        if failure_threshold < 1 or cooldown_s < 0:
            raise ValueError(f"failure_threshold >= 1 and cooldown_s >= 0, got {failure_threshold}, {cooldown_s}")
        self._threshold, self._cooldown_s = failure_threshold, cooldown_s

    @property
    def failures(self) -> int:
        """Consecutive failures recorded since the last success."""
        return self._failures

    def _cooled(self) -> bool:
        return self._clock() - self._opened_at >= self._cooldown_s

    def _fire(self, event: BreakerEvent, reason: str) -> Transition[BreakerState]:
        old = self._state
        self._state = next_state(old, event)
        if self._state is BreakerState.OPEN:
            self._opened_at = self._clock()
        self._trial = False
        return Transition(old, self._state, reason)

    def available(self) -> bool:
        """Would :meth:`acquire` let a request through now? A pure query: nothing changes."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            return self._cooled()
        return not self._trial

    def acquire(self) -> tuple[bool, Transition[BreakerState] | None]:
        """Ask to send one request now: (allowed, the transition this caused, if any)."""
        if self._state is BreakerState.CLOSED:
            return True, None
        if self._state is BreakerState.OPEN:
            if not self._cooled():
                return False, None
            transition = self._fire(BreakerEvent.COOLDOWN_ELAPSED, f"cooldown of {self._cooldown_s:g}s elapsed")
            self._trial = True
            self._trial_id += 1
            return True, transition
        if self._trial:
            return False, None
        self._trial = True  # the previous trial was released without a verdict
        self._trial_id += 1
        return True, None

    @property
    def trial_ticket(self) -> int:
        """The ticket of the trial holding the slot now (0: none); right after an allowed
        :meth:`acquire`, this request's own when it is the trial."""
        return self._trial_id if self._trial and self._state is BreakerState.HALF_OPEN else 0

    def record_success(self) -> Transition[BreakerState] | None:
        """A request got a good answer: reset the failure count; HALF_OPEN closes."""
        if self._state is BreakerState.OPEN:
            return None
        self._failures = 0
        if self._state is BreakerState.HALF_OPEN:
            return self._fire(BreakerEvent.TRIAL_SUCCEEDED, "trial request succeeded")
        return None

    def record_failure(self, reason: str) -> Transition[BreakerState] | None:
        """A request failed (``reason`` says how): trip at the threshold; HALF_OPEN reopens."""
        if self._state is BreakerState.OPEN:
            return None
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN:
            return self._fire(BreakerEvent.TRIAL_FAILED, f"trial request failed: {reason}")
        if self._failures >= self._threshold:
            return self._fire(BreakerEvent.TRIP, f"{self._failures} consecutive failures, last: {reason}")
        return None

    def recovered(self, reason: str) -> Transition[BreakerState] | None:
        """Active health checks saw the backend come back from UNHEALTHY: close at once."""
        self._failures = 0
        if self._state is BreakerState.CLOSED:
            return None
        return self._fire(BreakerEvent.RECOVERED, reason)

    def release(self, ticket: int | None = None) -> None:
        """The trial request ended without a verdict (e.g. the client left): free its slot;
        with ``ticket``, only if that trial still holds it (not a later one)."""
        if self._state is BreakerState.HALF_OPEN and (ticket is None or ticket == self._trial_id):
            self._trial = False

    def __repr__(self) -> str:
        text = f"<CircuitBreaker {self._state.name} fails={self._failures}"
        if self._state is BreakerState.OPEN:
            remaining = max(0.0, self._opened_at + self._cooldown_s - self._clock())
            text += f" reopen_in={remaining:.1f}s"
        elif self._state is BreakerState.HALF_OPEN:
            text += f" trial={'busy' if self._trial else 'free'}"
        return text + ">"
