"""The shared vocabulary of NTONIX's table-driven state machines (breaker, health).

Theory of operation: each machine writes its rules down as a ``TRANSITIONS`` table keyed by
``(state, event)``. :func:`advance` looks the pair up and raises :class:`IllegalTransition` when
the table has no entry, so a move that is not written down cannot happen. Methods that change
state return a :class:`Transition` so that the caller decides what to log or count (decide,
then act); the machines themselves do no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

StateT = TypeVar("StateT", bound=Enum)
EventT = TypeVar("EventT", bound=Enum)

__all__ = ["IllegalTransition", "Transition", "advance"]


@dataclass(frozen=True, slots=True)
class Transition(Generic[StateT]):
    """A state change that happened: from ``old`` to ``new``, and why (human readable)."""

    old: StateT
    new: StateT
    reason: str


class IllegalTransition(RuntimeError):
    """An event that the machine's table does not allow in the current state (a bug)."""

    def __init__(self, state: Enum, event: Enum) -> None:
        super().__init__(f"event {event.name} is not allowed in state {state.name}")
        self.state = state
        self.event = event


def advance(table: Mapping[tuple[StateT, EventT], StateT], state: StateT, event: EventT) -> StateT:
    """The state that ``event`` leads to from ``state``; IllegalTransition if there is none."""
    try:
        return table[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None
