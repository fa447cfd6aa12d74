"""Fakes for unit tests: plain objects that stand in for the clock. (The transport's fake is
``ntonix.upstream.fake.ScriptedTransport``, beside the Protocol it implements.)

Fakes over mocks (STYLE.md practice 14): each behaves like the real thing in the few ways
the code under test relies on, and can be read in a minute.
"""

from __future__ import annotations


class FakeClock:
    """A clock for pure code under test: ``clock()`` reads it, ``advance(s)`` moves it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
