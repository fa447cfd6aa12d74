"""Active health state of one backend, fed by periodic probes (``GET health.path``).

Theory of operation::

    HEALTHY --DOWN (unhealthy_threshold consecutive failed probes)--> UNHEALTHY
    UNHEALTHY --UP (healthy_threshold consecutive good probes)--> HEALTHY
    HEALTHY | UNHEALTHY --DRAIN--> DRAINING (terminal: the backend left the configuration)

A good probe resets the failure streak and a failed one resets the success streak, so one
flapping probe neither ejects nor restores a backend. DRAINING ignores probes: in-flight work
finishes but nothing new is routed there. The tracker only decides; whoever runs the probes
logs and counts the Transition it returns.
"""

from __future__ import annotations

from enum import Enum

from ntonix.core.transitions import IllegalTransition, Transition, advance

__all__ = [
    "TRANSITIONS",
    "HealthEvent",
    "HealthState",
    "HealthTracker",
    "IllegalTransition",
    "Transition",
    "next_state",
]


class HealthState(Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class HealthEvent(Enum):
    DOWN = "down"
    UP = "up"
    DRAIN = "drain"


TRANSITIONS: dict[tuple[HealthState, HealthEvent], HealthState] = {
    (HealthState.HEALTHY, HealthEvent.DOWN): HealthState.UNHEALTHY,
    (HealthState.UNHEALTHY, HealthEvent.UP): HealthState.HEALTHY,
    (HealthState.HEALTHY, HealthEvent.DRAIN): HealthState.DRAINING,
    (HealthState.UNHEALTHY, HealthEvent.DRAIN): HealthState.DRAINING,
}


def next_state(state: HealthState, event: HealthEvent) -> HealthState:
    """The state ``event`` leads to; IllegalTransition if TRANSITIONS has no such move."""
    return advance(TRANSITIONS, state, event)


class HealthTracker:
    """Turns a backend's probe results into HEALTHY / UNHEALTHY / DRAINING."""

    __slots__ = ("_fail_streak", "_healthy_threshold", "_ok_streak", "_state", "_unhealthy_threshold")

    def __init__(
        self, unhealthy_threshold: int, healthy_threshold: int, initial: HealthState = HealthState.HEALTHY
    ) -> None:
        if unhealthy_threshold < 1:
            raise ValueError(f"unhealthy_threshold: must be >= 1, got {unhealthy_threshold}")
        if healthy_threshold < 1:
            raise ValueError(f"healthy_threshold: must be >= 1, got {healthy_threshold}")
        self._unhealthy_threshold = unhealthy_threshold
        self._healthy_threshold = healthy_threshold
        self._state = initial
        self._fail_streak = 0
        self._ok_streak = 0

    @property
    def state(self) -> HealthState:
        return self._state

    @property
    def routable(self) -> bool:
        """May new requests go to this backend? Only when HEALTHY."""
        return self._state is HealthState.HEALTHY

    @property
    def fail_streak(self) -> int:
        return self._fail_streak

    @property
    def ok_streak(self) -> int:
        return self._ok_streak

    def _fire(self, event: HealthEvent, reason: str) -> Transition[HealthState]:
        old = self._state
        self._state = next_state(old, event)
        return Transition(old, self._state, reason)

    def record_probe(self, ok: bool, reason: str) -> Transition[HealthState] | None:
        """Count one probe result (``reason``: what it saw, e.g. "status 503"); the change, if any."""
        if self._state is HealthState.DRAINING:
            return None
        if ok:
            self._fail_streak = 0
            self._ok_streak += 1
            if self._state is HealthState.UNHEALTHY and self._ok_streak >= self._healthy_threshold:
                return self._fire(HealthEvent.UP, f"{self._ok_streak} consecutive probes passed, last: {reason}")
            return None
        self._ok_streak = 0
        self._fail_streak += 1
        if self._state is HealthState.HEALTHY and self._fail_streak >= self._unhealthy_threshold:
            return self._fire(HealthEvent.DOWN, f"{self._fail_streak} consecutive probes failed, last: {reason}")
        return None

    def set_thresholds(self, unhealthy_threshold: int, healthy_threshold: int) -> None:
        """New thresholds (a HUP): they count the probes seen so far too."""
        if unhealthy_threshold < 1 or healthy_threshold < 1:
            raise ValueError(f"thresholds must be >= 1, got {unhealthy_threshold}, {healthy_threshold}")
        self._unhealthy_threshold, self._healthy_threshold = unhealthy_threshold, healthy_threshold

    def probes_off(self, reason: str) -> Transition[HealthState] | None:
        """Active health checks were switched off: an UNHEALTHY backend is HEALTHY again (no probe
        could ever bring it back; the circuit breaker ejects it if it still fails)."""
        self._fail_streak = self._ok_streak = 0
        if self._state is HealthState.UNHEALTHY:
            return self._fire(HealthEvent.UP, reason)
        return None

    def drain(self, reason: str) -> Transition[HealthState] | None:
        """Stop routing here for good; None when already draining."""
        if self._state is HealthState.DRAINING:
            return None
        return self._fire(HealthEvent.DRAIN, reason)

    def __repr__(self) -> str:
        return f"<HealthTracker {self._state.value} fail_streak={self._fail_streak} ok_streak={self._ok_streak}>"
