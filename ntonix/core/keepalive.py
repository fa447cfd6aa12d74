"""What a backend allows for one keep-alive connection: the pool's pure decisions.

A backend says how long it keeps an idle connection and how many requests it serves on one
with ``Keep-Alive: timeout=T, max=N`` (RFC 2068 §19.7.1.1; llama.cpp's server sends
``timeout=5, max=100``), and that it closes one with ``Connection: close`` (which llhttp
reports through ``should_keep_alive``; see ntonix/transport.py). Servers read ``max``
differently (a total per connection, or the requests left, counting down), so the stricter
reading wins: ``max=N`` on the answer to the k-th request allows at most ``k + N - 1``
requests on the connection, ``max=1`` none after this one. A connection idle for nearly
``timeout`` is not reused: the backend may close it while our request is on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

# Reuse an idle connection only this long before the backend's announced idle timeout.
IDLE_MARGIN_S = 0.5


def parse_keep_alive(value: str | None) -> tuple[float | None, int | None]:
    """``(timeout_s, max)`` from a ``Keep-Alive`` header value; None for what it does not say."""
    timeout_s: float | None = None
    max_n: int | None = None
    for part in (value or "").split(","):
        name, _, raw = part.partition("=")
        name, raw = name.strip().lower(), raw.strip().strip('"')
        try:
            if name == "timeout":
                timeout_s = max(0.0, float(raw))
            elif name == "max":
                max_n = max(0, int(raw))
        except ValueError:
            continue  # a garbled parameter says nothing
    return timeout_s, max_n


@dataclass(slots=True)
class ConnState:
    """Requests sent on one connection and the limits its backend announced."""

    uses: int = 0
    max_uses: int | None = None
    idle_limit_s: float | None = None

    def answered(self, keep_alive: str | None) -> None:
        """Take in the ``Keep-Alive`` header of the answer to request number ``uses``."""
        timeout_s, max_n = parse_keep_alive(keep_alive)
        if max_n is not None:
            limit = self.uses + max_n - 1
            self.max_uses = limit if self.max_uses is None else min(self.max_uses, limit)
        if timeout_s is not None:
            self.idle_limit_s = max(timeout_s - IDLE_MARGIN_S, timeout_s / 2)

    def reusable(self) -> bool:
        """Whether the backend allows another request on this connection."""
        return self.max_uses is None or self.uses < self.max_uses

    def idle_ok(self, idle_s: float) -> bool:
        """Whether a connection idle for ``idle_s`` is still safely inside the backend's timeout."""
        return self.idle_limit_s is None or idle_s < self.idle_limit_s
