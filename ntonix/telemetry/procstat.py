"""Facts about the gateway's processes: resident memory, the master's PID and start time.

The master stamps its PID and start time into the environment (``stamp_master``, from
``ntonix.server.hooks``) before any worker forks, so every worker knows whose memory to
add and how long the gateway (not the worker) has been up. Without a master (the WSGI app
run some other way) the process itself counts as the start.

Imports nothing from prometheus_client: the master loads this module before it sets
``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import MutableMapping

MASTER_PID_ENV = "_NTONIX_MASTER_PID"
STARTED_AT_ENV = "_NTONIX_STARTED_AT"

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PROCESS_STARTED = time.time()


def stamp_master(environ: MutableMapping[str, str] = os.environ) -> None:
    """In the master, once: its PID and start time for the workers it will fork."""
    if environ.get(MASTER_PID_ENV) != str(os.getpid()):
        environ[MASTER_PID_ENV] = str(os.getpid())
        environ[STARTED_AT_ENV] = repr(time.time())


def master_pid() -> int | None:
    """The master's PID when this process is one of its workers, else ``None``."""
    raw = os.environ.get(MASTER_PID_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) == os.getppid() else None


def started_at() -> float:
    """When the gateway started (the master's clock), for ``uptime_s``."""
    try:
        return float(os.environ[STARTED_AT_ENV])
    except (KeyError, ValueError):
        return _PROCESS_STARTED


def rss_bytes(pid: int | None = None) -> int:
    """Current resident set size of ``pid`` (default: this process) in bytes; 0 if unknown.

    Linux: ``/proc/<pid>/statm`` (pages). Elsewhere, for this process only, the peak RSS.
    """
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        if pid is not None:
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
