"""The owner of a worker's request-side background greenlets, joined when the worker drains.

A coalescing leader whose own client left keeps reading the backend's answer for its
followers (``UpstreamBody.close`` in ``ntonix/gateway/bodies.py``); those followers may be
requests of other workers of the host. The reading goes on in a greenlet that no client
connection holds, so the worker's drain, which waits for connections, would not wait for it:
a worker stopping on TERM would cut the followers' answers. ``Background`` keeps these
greenlets in one group; the worker joins it, within its graceful timeout, before it exits.
(The prober's greenlets are its own: it is stopped, not drained.)
"""

from __future__ import annotations

from collections.abc import Callable

import gevent.pool


class Background:
    """Spawns and tracks background greenlets; ``join`` waits for those still running."""

    def __init__(self) -> None:
        self._group = gevent.pool.Group()

    def __repr__(self) -> str:
        return f"<Background running={len(self._group)}>"

    def __len__(self) -> int:
        return len(self._group)

    def spawn(self, work: Callable[[], None]) -> None:
        self._group.spawn(work)

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every background greenlet; True when none is left."""
        return bool(self._group.join(timeout=timeout_s))
