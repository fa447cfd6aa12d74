"""Child processes and /proc readings for the tools: one copy, shared by bench, soak and demo.

Every child runs in its own session (``start_new_session``), writes to a log file and is
stopped by its PID: SIGTERM, a wait, then SIGKILL to its process group (workers a master
left behind included). Nothing here matches processes by name.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from tools import ROOT

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
T = TypeVar("T")


# ----------------------------------------------------------------------------- ports


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], T | None], child: Child | None = None, timeout: float = 30.0,
               every: float = 0.05) -> T:
    """``check()`` until it returns a true value (OSError counts as not yet); raise on timeout
    or when ``child`` exits first."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited with status {child.popen.returncode} while waiting for {what}"
                               f" (log: {child.log_path})")
        try:
            value = check()
            if value:
                return value
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            why = f" (last: {last})" if last else ""
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}{why}")
        time.sleep(every)


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def http_ok(port: int, path: str) -> bool:
    """Whether ``GET path`` answers at all (any status)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    finally:
        conn.close()


# ----------------------------------------------------------------------------- children


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without NTONIX_* / PROMETHEUS_* (a developer's settings must not change
    what a tool starts), unbuffered Python output, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NTONIX_", "_NTONIX_", "PROMETHEUS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Child:
    """A child process in its own session, output appended to ``log_path``, stopped by PID."""

    def __init__(self, name: str, argv: list[str], log_path: str | Path, env: dict[str, str] | None = None,
                 cwd: str | Path = ROOT) -> None:
        self.name, self.log_path = name, str(log_path)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, cwd=cwd, env=env if env is not None else clean_env(), stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill_hard(self) -> None:
        """SIGKILL the whole process group (a gunicorn master and its workers)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        """``sig`` to the child, wait up to ``timeout``, then SIGKILL what is left of its group."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"   ({self.name} did not stop in {timeout:g} s: SIGKILL)", flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # anything left in its session
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        return self.popen.returncode

    def tail(self, n: int = 20) -> str:
        with open(self.log_path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])


# ----------------------------------------------------------------------------- /proc


def parse_stat(raw: str) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` line from the 3rd (state) on: ``[0]`` state,
    ``[1]`` ppid, ``[11]`` utime, ``[12]`` stime (the command may hold spaces and parentheses)."""
    return raw[raw.rindex(")") + 2:].split()


def stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return parse_stat(fh.read().decode(errors="replace"))


def children_map() -> dict[int, list[int]]:
    """ppid -> its children, for every process now."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descend(pid: int, kids: dict[int, list[int]]) -> list[int]:
    """``pid`` and all its descendants in ``kids`` (ppid -> children), parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(sorted(kids.get(p, [])))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, now."""
    return descend(pid, children_map())


def children_of(pid: int) -> list[int]:
    return sorted(children_map().get(pid, []))


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of ``pids`` (ones that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            f = stat_fields(pid)
            total += int(f[11]) + int(f[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / CLK


def rss_bytes(pids: Iterable[int]) -> int:
    return rss_and_shared(pids)[0]


def rss_and_shared(pids: Iterable[int]) -> tuple[int, int]:
    """Resident bytes of ``pids`` summed, and of those the file-backed and shared-memory pages
    (``/proc/<pid>/statm`` fields 2 and 3: RssFile + RssShmem; the rest is anonymous memory)."""
    rss = shared = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                fields = fh.read().split()
            rss += int(fields[1]) * PAGE
            shared += int(fields[2]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
    return rss, shared


def status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """The ``keys`` (e.g. ``RssAnon``) of ``/proc/<pid>/status`` in KiB; {} when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in text.splitlines()) if k in keys}


def parse_status_rss(text: str) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) in KiB from a ``/proc/<pid>/status`` text; RssAnon falls back to VmRSS."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "RssAnon:")):
            found[line.split(":")[0]] = int(line.split()[1])
    if "VmRSS" not in found:
        return None
    return found["VmRSS"], found.get("RssAnon", found["VmRSS"])


def rss_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) in KiB. RssAnon leaves out file pages (the LMDB cache tier is a mapped
    file, whose pages count in VmRSS as they are touched): its growth is the heap's."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return parse_status_rss(fh.read())
    except OSError:
        return None


def parse_cpu_busy(text: str) -> dict[int, int]:
    """Busy jiffies per CPU (user, nice, system, irq, softirq, steal) from a /proc/stat text."""
    out = {}
    for line in text.splitlines():
        name, *rest = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            f = [int(x) for x in rest]
            out[int(name[3:])] = f[0] + f[1] + f[2] + f[5] + f[6] + f[7]
    return out


def busy_jiffies() -> dict[int, int]:
    with open("/proc/stat") as fh:
        return parse_cpu_busy(fh.read())


def own_cpu_seconds() -> float:
    """CPU time of this process and its waited-for children."""
    ru, rc = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime + rc.ru_utime + rc.ru_stime
