"""Notice a client that went away while we wait on the backend, and stop the work.

gunicorn only notices a gone client when a write fails (docs/notes/stack.md §2), so a request still
waiting for the backend's first byte would keep the backend busy. ``watch`` arms a libev
timer (no greenlet, so a fast request pays almost nothing); after ``delay_s`` it starts an io
watcher on the client socket. When the socket becomes readable we ask the kernel, without
blocking, whether the peer hung up (``POLLRDHUP``); if so the handler greenlet is killed
with ``ClientGone`` (a ``GreenletExit``, which gunicorn's gevent worker swallows), and the
``finally`` blocks of the request close the backend connection. Readable without a hang-up
(pipelined bytes, a TLS alert) stops the io watcher and re-checks on a timer instead, so
there is never a busy loop.
"""

from __future__ import annotations

import select as _select_module
from typing import Any

import gevent
from gevent import monkey

_poll = monkey.get_original("select", "poll")
_POLLRDHUP = getattr(_select_module, "POLLRDHUP", 0x2000)
_HANGUP = _POLLRDHUP | _select_module.POLLHUP | _select_module.POLLERR | _select_module.POLLNVAL
RECHECK_S = 0.25


class ClientGone(gevent.GreenletExit):  # type: ignore[misc]
    """The client closed its connection; raised in the handler greenlet to stop the request."""


def peer_hung_up(fd: int) -> bool:
    p = _poll()
    p.register(fd, _POLLRDHUP | _select_module.POLLIN)
    return any(ev & _HANGUP for _, ev in p.poll(0))


class Watch:
    __slots__ = ("_fd", "_greenlet", "_io", "_loop", "_timer", "gone")

    def __init__(self, sock: Any, delay_s: float) -> None:
        self._greenlet = gevent.getcurrent()
        self._loop = gevent.get_hub().loop
        self._fd = sock.fileno()
        self._io: Any = None
        self.gone = False
        self._timer = self._loop.timer(delay_s)
        self._timer.start(self._arm)

    def _arm(self) -> None:
        if self._fd < 0:
            return
        self._io = self._loop.io(self._fd, 1)
        self._io.start(self._readable)

    def _readable(self) -> None:
        self._io.stop()
        self._check()

    def _check(self) -> None:
        """Kill the handler if the peer hung up; otherwise look again in RECHECK_S (no busy loop)."""
        try:
            hung = peer_hung_up(self._fd)
        except OSError:
            hung = True
        if hung:
            self.gone = True
            self.cancel()
            gevent.kill(self._greenlet, ClientGone)
            return
        self._timer.close()
        self._timer = self._loop.timer(RECHECK_S)
        self._timer.start(self._check)

    def cancel(self) -> None:
        self._timer.close()
        if self._io is not None:
            self._io.close()
            self._io = None
        self._fd = -1


def watch(sock: Any, delay_s: float = 0.05) -> Watch | None:
    """Start watching ``sock`` for a hang-up; ``None`` when there is no usable socket."""
    try:
        return Watch(sock, delay_s)
    except (OSError, AttributeError, ValueError):
        return None
