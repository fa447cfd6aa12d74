from __future__ import annotations

import pytest

from ntonix.core.health import (
    TRANSITIONS,
    HealthEvent,
    HealthState,
    HealthTracker,
    IllegalTransition,
    Transition,
    next_state,
)
from ntonix.core.transitions import Transition as SharedTransition

HEALTHY, UNHEALTHY, DRAINING = HealthState.HEALTHY, HealthState.UNHEALTHY, HealthState.DRAINING


def test_state_values() -> None:
    assert [s.value for s in HealthState] == ["healthy", "unhealthy", "draining"]


def test_transition_type_is_shared_with_breaker() -> None:
    from ntonix.core import breaker

    assert Transition is SharedTransition is breaker.Transition
    assert IllegalTransition is breaker.IllegalTransition


def test_table() -> None:
    assert TRANSITIONS == {
        (HEALTHY, HealthEvent.DOWN): UNHEALTHY,
        (UNHEALTHY, HealthEvent.UP): HEALTHY,
        (HEALTHY, HealthEvent.DRAIN): DRAINING,
        (UNHEALTHY, HealthEvent.DRAIN): DRAINING,
    }


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in HealthState for e in HealthEvent if (s, e) not in TRANSITIONS],
)
def test_illegal_events_raise(state: HealthState, event: HealthEvent) -> None:
    with pytest.raises(IllegalTransition):
        next_state(state, event)


def test_draining_is_terminal() -> None:
    assert all(s is not DRAINING for s, _ in TRANSITIONS)


def test_starts_healthy_and_routable() -> None:
    h = HealthTracker(unhealthy_threshold=3, healthy_threshold=2)
    assert h.state is HEALTHY
    assert h.routable


def test_unhealthy_after_threshold_failed_probes() -> None:
    h = HealthTracker(unhealthy_threshold=3, healthy_threshold=2)
    assert h.record_probe(False, "status 500") is None
    assert h.record_probe(False, "timeout") is None
    assert h.routable
    t = h.record_probe(False, "connection refused")
    assert t == Transition(HEALTHY, UNHEALTHY, "3 consecutive probes failed, last: connection refused")
    assert (h.state, h.routable) == (UNHEALTHY, False)
    assert h.record_probe(False, "still down") is None  # no repeated transition


def test_healthy_again_after_threshold_good_probes() -> None:
    h = HealthTracker(unhealthy_threshold=1, healthy_threshold=2, initial=UNHEALTHY)
    assert not h.routable
    assert h.record_probe(True, "status 200") is None
    t = h.record_probe(True, "status 200")
    assert t == Transition(UNHEALTHY, HEALTHY, "2 consecutive probes passed, last: status 200")
    assert (h.state, h.routable) == (HEALTHY, True)
    assert h.record_probe(True, "status 200") is None


def test_a_good_probe_resets_the_failure_streak() -> None:
    h = HealthTracker(unhealthy_threshold=3, healthy_threshold=1)
    h.record_probe(False, "x")
    h.record_probe(False, "x")
    h.record_probe(True, "ok")
    assert h.fail_streak == 0
    assert h.ok_streak == 1
    h.record_probe(False, "x")
    h.record_probe(False, "x")
    assert h.state is HEALTHY
    assert h.record_probe(False, "x") is not None


def test_a_failed_probe_resets_the_success_streak() -> None:
    h = HealthTracker(unhealthy_threshold=1, healthy_threshold=3, initial=UNHEALTHY)
    h.record_probe(True, "ok")
    h.record_probe(True, "ok")
    h.record_probe(False, "flap")
    assert h.ok_streak == 0
    assert h.fail_streak == 1
    h.record_probe(True, "ok")
    h.record_probe(True, "ok")
    assert h.state is UNHEALTHY
    assert h.record_probe(True, "ok") is not None


def test_thresholds_of_one_flip_at_once() -> None:
    h = HealthTracker(unhealthy_threshold=1, healthy_threshold=1)
    t1 = h.record_probe(False, "x")
    t2 = h.record_probe(True, "y")
    assert t1 is not None
    assert t1.new is UNHEALTHY
    assert t2 is not None
    assert t2.new is HEALTHY


@pytest.mark.parametrize(("unhealthy", "healthy"), [(0, 1), (1, 0), (-2, 3)])
def test_invalid_thresholds(unhealthy: int, healthy: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        HealthTracker(unhealthy_threshold=unhealthy, healthy_threshold=healthy)


@pytest.mark.parametrize("start", [HEALTHY, UNHEALTHY])
def test_drain_is_terminal_and_ignores_probes(start: HealthState) -> None:
    h = HealthTracker(unhealthy_threshold=1, healthy_threshold=1, initial=start)
    t = h.drain("removed from configuration")
    assert t == Transition(start, DRAINING, "removed from configuration")
    assert h.state is DRAINING
    assert not h.routable
    assert h.record_probe(True, "ok") is None
    assert h.record_probe(False, "x") is None
    assert h.drain("again") is None
    assert h.state is DRAINING


def test_repr() -> None:
    h = HealthTracker(unhealthy_threshold=3, healthy_threshold=2)
    h.record_probe(False, "x")
    assert repr(h) == "<HealthTracker healthy fail_streak=1 ok_streak=0>"
    h.drain("bye")
    assert repr(h).startswith("<HealthTracker draining")
