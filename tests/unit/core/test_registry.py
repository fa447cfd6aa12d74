"""The registry of backends (ntonix.core.registry): eligibility, picking, reload and draining."""

from __future__ import annotations

from ntonix.config.model import BackendConfig, CircuitBreakerConfig, HealthConfig
from ntonix.core.models import configured
from ntonix.core.registry import Registry
from tests.fakes import FakeClock

HEALTH = HealthConfig(unhealthy_threshold=2, healthy_threshold=1)
BREAKER = CircuitBreakerConfig(failure_threshold=2, cooldown_s=10.0)


def registry(*specs: tuple[int, int], clock: FakeClock | None = None) -> Registry:
    backends = [BackendConfig("10.0.0.1", port, weight) for port, weight in specs]
    return Registry(backends, HEALTH, BREAKER, clock=clock or FakeClock())


def test_pick_is_weighted_round_robin_over_eligible_backends() -> None:
    reg = registry((1, 2), (2, 1))
    picked = [b.address for b in (reg.pick() for _ in range(6)) if b is not None]
    assert picked == ["10.0.0.1:1", "10.0.0.1:2", "10.0.0.1:1"] * 2


def test_pick_excludes_tried_backends_and_returns_none_when_none_left() -> None:
    reg = registry((1, 1), (2, 1))
    first = reg.pick()
    assert first is not None
    second = reg.pick(exclude={first.address})
    assert second is not None and second.address != first.address
    assert reg.pick(exclude={first.address, second.address}) is None


def test_an_open_breaker_takes_a_backend_out_until_its_cooldown() -> None:
    clock = FakeClock()
    reg = registry((1, 1), (2, 1), clock=clock)
    a = reg.backends["10.0.0.1:1"]
    a.breaker.record_failure("x")
    assert a.breaker.record_failure("x") is not None  # tripped: the caller logs this transition
    assert (a.state, reg.healthy_count()) == ("open", 1)
    assert [reg.pick().address for _ in range(3)] == ["10.0.0.1:2"] * 3  # type: ignore[union-attr]
    clock.advance(10.0)
    assert a.eligible  # half-open: one trial request may go
    assert "breaker=" in repr(a) and "10.0.0.1:1" in repr(a)


def test_failed_probes_make_a_backend_unhealthy() -> None:
    reg = registry((1, 1))
    b = reg.backends["10.0.0.1:1"]
    assert b.health.record_probe(False, "refused") is None
    assert b.health.record_probe(False, "refused") is not None
    assert (b.state, reg.healthy_count(), reg.pick()) == ("unhealthy", 0, None)


def test_reload_keeps_state_adds_new_and_drains_removed() -> None:
    reg = registry((1, 1), (2, 1))
    kept = reg.backends["10.0.0.1:1"]
    kept.breaker.record_failure("x")
    gone = reg.backends["10.0.0.1:2"]
    gone.in_flight = 1
    added, removed, changes = reg.reload([BackendConfig("10.0.0.1", 1, 5), BackendConfig("10.0.0.1", 3, 1)],
                                         HEALTH, BREAKER)
    assert [b.address for b in added] == ["10.0.0.1:3"]
    assert removed == [gone] and gone.state == "draining" and not gone.eligible
    assert [(c.backend, c.kind) for c in changes] == [("10.0.0.1:2", "health")]
    assert reg.backends["10.0.0.1:1"] is kept and kept.config.weight == 5
    assert sorted(b.address for b in reg.all()) == ["10.0.0.1:1", "10.0.0.1:2", "10.0.0.1:3"]
    assert reg.finished_draining() == []  # a request still in flight
    gone.in_flight = 0
    assert reg.finished_draining() == [gone]
    assert reg.draining == []


def test_kept_backends_follow_the_reloaded_thresholds() -> None:
    # The audit: only backends added by a HUP used the new health and breaker settings.
    clock = FakeClock()
    reg = registry((1, 1), clock=clock)
    kept = reg.backends["10.0.0.1:1"]
    reg.reload([BackendConfig("10.0.0.1", 1, 1)], HealthConfig(unhealthy_threshold=1, healthy_threshold=3),
               CircuitBreakerConfig(failure_threshold=1, cooldown_s=2.0))
    assert kept.health.record_probe(False, "refused") is not None  # one failed probe is enough now
    for _ in range(2):
        assert kept.health.record_probe(True, "200") is None  # three good ones to come back
    assert kept.health.record_probe(True, "200") is not None
    assert kept.breaker.record_failure("x") is not None  # one failure opens it
    clock.advance(2.0)
    assert kept.eligible  # after the new cooldown


def test_switching_health_checks_off_brings_unhealthy_backends_back() -> None:
    # No probe runs any more, so nothing else could: the breaker ejects it if it still fails.
    reg = registry((1, 1), (2, 1))
    sick = reg.backends["10.0.0.1:2"]
    sick.health.record_probe(False, "refused")
    sick.health.record_probe(False, "refused")
    assert sick.state == "unhealthy"
    configs = [BackendConfig("10.0.0.1", 1, 1), BackendConfig("10.0.0.1", 2, 1)]
    _, _, changes = reg.reload(configs, HealthConfig(enabled=False, unhealthy_threshold=2, healthy_threshold=1),
                               BREAKER)
    assert sick.state == "healthy" and reg.healthy_count() == 2
    assert [(c.backend, c.kind, c.transition.new.value) for c in changes] == [("10.0.0.1:2", "health", "healthy")]
    _, _, changes = reg.reload(configs, HEALTH, BREAKER)  # and back on: probes decide again
    assert changes == [] and sick.state == "healthy"


def test_serving_filters_by_model_and_reload_keeps_or_resets_lists() -> None:
    cfgs = [BackendConfig("10.0.0.1", 1, 1, ("m1",)), BackendConfig("10.0.0.1", 2, 1, None)]
    reg = Registry(cfgs, HEALTH, BREAKER, clock=FakeClock())
    listed, learning = reg.backends["10.0.0.1:1"], reg.backends["10.0.0.1:2"]
    assert reg.learning() == [learning]
    assert reg.serving("m1") == [listed, learning]  # a backend with no known list serves any model
    learning.models = configured(["m2"])
    assert reg.serving("m2") == [learning]
    assert reg.serving("m3") == []
    assert reg.serving(None) == [listed, learning]
    # HUP: a configured list replaces a learnt one; a list no longer configured is learnt again.
    reg.reload([BackendConfig("10.0.0.1", 1, 1, None), BackendConfig("10.0.0.1", 2, 1, ("m4",))], HEALTH, BREAKER)
    assert listed.models is None and reg.learning() == [listed]
    assert learning.models is not None and list(learning.models) == ["m4"]
    assert (listed.weight, listed.max_in_flight, listed.routable) == (1, 0, True)
