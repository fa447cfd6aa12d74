"""One request's attempt on one backend, settled exactly once (no I/O).

Theory of operation::

    Attempt.start(backend)            breaker.acquire(); refused -> (None, transition)
        |                             allowed -> in_flight += 1
        +-- succeeded()  -> breaker.record_success()   )  in_flight -= 1, then
        +-- failed(why)  -> breaker.record_failure()   )  ``on_settle`` (the gateway's
        +-- abandoned()  -> breaker.release()          )  routing place given back)

The gateway starts an attempt once routing chose a backend (``ntonix.gateway.proxy``) and
settles it where the outcome is known: a send that failed, or the relayed body's close
(``ntonix.gateway.bodies``). ``in_flight`` and the breaker's verdict change here only.
``succeeded`` and ``failed`` return the breaker's transition, if any, for the caller to log;
``abandoned`` (the client left: no verdict on the backend) frees a breaker trial and returns
nothing. A second settle is a bug and raises :class:`AlreadySettled` (as an illegal breaker
event raises ``IllegalTransition``); cleanup paths that may run after a settle check
``settled`` first.

``on_settle`` is how the I/O layer hangs its own release on the attempt (the host-wide routing
place, ``ntonix.routing.select.Lease``, lives in shared memory): it runs once, on the settle,
and on a start the breaker refused. The attempt itself only sets attributes.
"""

from __future__ import annotations

from collections.abc import Callable

from ntonix.core.breaker import BreakerState
from ntonix.core.registry import Backend
from ntonix.core.transitions import Transition

__all__ = ["AlreadySettled", "Attempt"]


class AlreadySettled(RuntimeError):
    """An attempt was settled twice (its outcome is recorded once)."""


def _nothing() -> None:
    return None


class Attempt:
    """A request in flight on ``backend``; exactly one of succeeded / failed / abandoned."""

    __slots__ = ("backend", "on_settle", "outcome", "trial")

    def __init__(self, backend: Backend, on_settle: Callable[[], None] = _nothing, *, trial: int = 0) -> None:
        """Counts the request in flight; use :meth:`start`, which asks the breaker first.
        ``trial``: the ticket of the half-open breaker's trial slot this request holds (0: none)."""
        self.backend = backend
        self.on_settle = on_settle
        self.outcome = ""  # "" while in flight, then "succeeded", "failed" or "abandoned"
        self.trial = trial
        backend.in_flight += 1

    @classmethod
    def start(cls, backend: Backend, on_settle: Callable[[], None] = _nothing,
              ) -> tuple[Attempt | None, Transition[BreakerState] | None]:
        """(the attempt, or None when the breaker refused; the breaker's transition, if any).

        A refused start runs ``on_settle`` at once: nothing was sent, the place is given back."""
        allowed, change = backend.breaker.acquire()
        if not allowed:
            on_settle()
            return None, change
        return cls(backend, on_settle, trial=backend.breaker.trial_ticket), change

    @property
    def settled(self) -> bool:
        return self.outcome != ""

    def _settle(self, outcome: str) -> None:
        if self.outcome:
            raise AlreadySettled(f"attempt on {self.backend.address} already {self.outcome}, now {outcome}")
        self.outcome = outcome
        self.backend.in_flight -= 1
        self.on_settle()

    def succeeded(self) -> Transition[BreakerState] | None:
        """The backend answered well: its breaker's failure count resets (a trial closes it)."""
        self._settle("succeeded")
        return self.backend.breaker.record_success()

    def failed(self, reason: str) -> Transition[BreakerState] | None:
        """The backend failed this request (``reason`` says how): a failure for its breaker."""
        self._settle("failed")
        return self.backend.breaker.record_failure(reason)

    def abandoned(self) -> None:
        """Ended with no verdict on the backend (the client left, the worker stops, no free
        connection): frees the breaker's trial slot if this request held it, and only then (a
        request admitted before the breaker opened must not free another one's trial)."""
        self._settle("abandoned")
        if self.trial:
            self.backend.breaker.release(self.trial)  # a later trial's slot stays taken

    def __repr__(self) -> str:
        return f"<Attempt {self.backend.address} {self.outcome or 'in flight'}>"
