"""The backends a worker routes to: health state, breaker and counters per backend (no I/O).

A backend is eligible for a new request when its active health state is HEALTHY and its
circuit breaker lets a request through. ``pick`` runs smooth weighted round-robin over the
eligible ones (excluding those a request already tried). ``reload`` applies a new backend
list: existing backends keep their state, new ones start healthy, removed ones are drained
(no new requests; the caller closes their pools once their in-flight requests are done).

Every method that changes a state returns the transitions, so the caller logs them once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from ntonix.config.model import BackendConfig, CircuitBreakerConfig, HealthConfig
from ntonix.core.balancer import SmoothWeightedRoundRobin
from ntonix.core.breaker import BreakerState, CircuitBreaker
from ntonix.core.health import HealthState, HealthTracker
from ntonix.core.models import ModelList, configured
from ntonix.core.transitions import Transition


@dataclass(slots=True)
class Backend:
    config: BackendConfig
    health: HealthTracker
    breaker: CircuitBreaker
    pool: Any = None  # the transport's pool, attached by the I/O layer
    in_flight: int = 0
    removed: bool = False
    # The models it serves (``ntonix.core.models``): configured, learnt from its GET /v1/models,
    # or None = any model (not known yet, or it has no such list).
    models: ModelList | None = None
    # host:port, fixed for the backend's life (a reload keeps a backend by its address); kept
    # as a plain attribute because routing reads it several times per request.
    address: str = field(init=False)

    def __post_init__(self) -> None:
        self.address = self.config.address

    # What routing needs of a backend (``ntonix.routing.select.Target``).
    @property
    def weight(self) -> int:
        return self.config.weight

    @property
    def max_in_flight(self) -> int:
        return self.config.max_in_flight

    @property
    def routable(self) -> bool:
        return self.eligible

    @property
    def eligible(self) -> bool:
        return not self.removed and self.health.routable and self.breaker.available()

    @property
    def state(self) -> str:
        """One word for operators: healthy, unhealthy, draining, open (breaker) or half_open."""
        if self.removed or self.health.state is HealthState.DRAINING:
            return "draining"
        if self.health.state is not HealthState.HEALTHY:
            return str(self.health.state.value)
        if self.breaker.state is not BreakerState.CLOSED:
            return str(self.breaker.state.value)
        return "healthy"

    def __repr__(self) -> str:
        return (f"<Backend {self.address} w={self.config.weight} {self.state} "
                f"breaker={self.breaker.state.name} in_flight={self.in_flight}>")


@dataclass(frozen=True, slots=True)
class Change:
    backend: str
    kind: str  # "health" or "breaker" or "membership"
    transition: Transition[Any]


class Registry:
    def __init__(self, backends: Iterable[BackendConfig], health: HealthConfig, breaker: CircuitBreakerConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._health_cfg = health
        self._breaker_cfg = breaker
        self._clock = clock
        self.backends: dict[str, Backend] = {}
        self.draining: list[Backend] = []
        configs = list(backends)
        for cfg in configs:
            self.backends[cfg.address] = self._new(cfg)
        self._balancer = SmoothWeightedRoundRobin([(c.address, c.weight) for c in configs])

    def _new(self, cfg: BackendConfig) -> Backend:
        return Backend(
            config=cfg,
            health=HealthTracker(self._health_cfg.unhealthy_threshold, self._health_cfg.healthy_threshold),
            breaker=CircuitBreaker(self._breaker_cfg.failure_threshold, self._breaker_cfg.cooldown_s,
                                   clock=self._clock),
            models=configured(cfg.models) if cfg.models is not None else None,
        )

    def __repr__(self) -> str:
        return f"<Registry {list(self.backends.values())!r}>"

    def pick(self, exclude: Collection[str] = ()) -> Backend | None:
        eligible = {a for a, b in self.backends.items() if a not in exclude and b.eligible}
        if not eligible:
            return None
        name = self._balancer.pick(eligible)
        return self.backends[name] if name is not None else None

    def serving(self, model: str | None) -> list[Backend]:
        """The configured backends (routable or not) that take a request for ``model``."""
        if model is None:
            return list(self.backends.values())
        return [b for b in self.backends.values() if b.models is None or model in b.models]

    def learning(self) -> list[Backend]:
        """Backends whose model list comes from their ``GET /v1/models``."""
        return [b for b in self.backends.values() if b.config.models is None]

    def healthy_count(self) -> int:
        return sum(1 for b in self.backends.values() if b.eligible)

    def all(self) -> list[Backend]:
        return list(self.backends.values()) + self.draining

    def reload(self, configs: Iterable[BackendConfig], health: HealthConfig,
               breaker: CircuitBreakerConfig) -> tuple[list[Backend], list[Backend], list[Change]]:
        """Apply a new backend list: (added, removed, changes)."""
        self._health_cfg, self._breaker_cfg = health, breaker
        configs = list(configs)
        wanted = {c.address: c for c in configs}
        added, removed, changes = [], [], []
        for address, backend in list(self.backends.items()):
            if address not in wanted:
                backend.removed = True
                t = backend.health.drain("removed from the configuration")
                if t is not None:
                    changes.append(Change(address, "health", t))
                self.draining.append(self.backends.pop(address))
                removed.append(backend)
        for backend in (*self.backends.values(), *self.draining):
            # Kept backends follow the new thresholds too (only new ones did: the audit).
            backend.health.set_thresholds(health.unhealthy_threshold, health.healthy_threshold)
            backend.breaker.set_thresholds(breaker.failure_threshold, breaker.cooldown_s)
            if not health.enabled:
                t = backend.health.probes_off("active health checks switched off")
                if t is not None:
                    changes.append(Change(backend.address, "health", t))
        for address, cfg in wanted.items():
            current = self.backends.get(address)
            if current is None:
                # A backend removed earlier and still draining keeps its own pool until done.
                self.backends[address] = new = self._new(cfg)
                added.append(new)
            elif current.config != cfg:
                if cfg.models is not None:
                    current.models = configured(cfg.models)
                elif current.config.models is not None:
                    current.models = None  # to be learnt: any model until its list is known
                current.config = cfg
        self._balancer.update([(c.address, c.weight) for c in configs])
        return added, removed, changes

    def finished_draining(self) -> list[Backend]:
        """Removed backends with nothing in flight any more (their pools may be closed)."""
        done = [b for b in self.draining if b.in_flight == 0]
        self.draining = [b for b in self.draining if b.in_flight > 0]
        return done
