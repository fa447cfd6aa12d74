"""This process's pid without a system call per read: ``os.getpid()`` is one, and the request
path asks often (is this connection, pool or cache handle still this process's after a fork?).
The pid only changes at a fork, so it is refreshed there."""

from __future__ import annotations

import os


class Process:
    """``Process.pid``: this process's pid, refreshed in a forked child."""

    pid = os.getpid()

    @classmethod
    def _forked(cls) -> None:
        cls.pid = os.getpid()


os.register_at_fork(after_in_child=Process._forked)
