"""CPU and memory of the targets over one run, from /proc (see docs/performance.md, "What the columns mean")."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

from tools.procs import CLK, busy_jiffies, cpu_seconds, own_cpu_seconds, rss_and_shared, status_kib, tree


class Pinned(Protocol):
    """A process the bench started, pinned to one CPU."""

    @property
    def pid(self) -> int: ...

    cpu: int


class Meter:
    """CPU of the target tree over one run, and what processes outside the bench took meanwhile.

    Everything the bench runs is pinned: proxies to the proxy CPU, backends, load generators
    and this script to the load CPU. So per CPU, busy time minus the bench's own processes
    there is foreign work: ``other_proxy_pct`` and ``other_load_pct``, in % of that CPU.
    """

    def __init__(self, target: Pinned | None, procs: Sequence[Pinned], proxy_cpu: int, load_cpu: int) -> None:
        self.target = target
        self.procs = procs
        self.proxy_cpu, self.load_cpu = proxy_cpu, load_cpu

    def _others(self) -> tuple[float, float]:
        on_proxy = on_load = 0.0
        for proc in self.procs:
            if proc is self.target:
                continue
            c = cpu_seconds(self._trees.setdefault(proc.pid, tree(proc.pid)))
            if proc.cpu == self.proxy_cpu:
                on_proxy += c
            else:
                on_load += c
        return on_proxy, on_load + own_cpu_seconds()

    def __enter__(self) -> Meter:
        self._trees: dict[int, list[int]] = {}
        self.t_pids = tree(self.target.pid) if self.target else []
        self.t0 = time.monotonic()
        self.c_target = cpu_seconds(self.t_pids)
        self.c_others = self._others()
        self.busy = busy_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = max(time.monotonic() - self.t0, 1e-9)
        if self.target:
            self.t_pids = sorted(set(self.t_pids) | set(tree(self.target.pid)))
        self.target_cpu = cpu_seconds(self.t_pids) - self.c_target
        proxy_side, load_side = (a - b for a, b in zip(self._others(), self.c_others, strict=True))
        busy = busy_jiffies()
        bp = (busy.get(self.proxy_cpu, 0) - self.busy.get(self.proxy_cpu, 0)) / CLK
        bl = (busy.get(self.load_cpu, 0) - self.busy.get(self.load_cpu, 0)) / CLK
        self.other_proxy_pct = max(0.0, bp - self.target_cpu - proxy_side) / self.wall * 100
        self.other_load_pct = max(0.0, bl - load_side) / self.wall * 100

    @property
    def figures(self) -> dict[str, float]:
        return {"other_proxy_pct": self.other_proxy_pct, "other_load_pct": self.other_load_pct}


class RssSampler(threading.Thread):
    """Peak RSS of a process tree, sampled every ``every`` seconds while running."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.pids = tree(pid)
        self.peak = 0
        self.peak_shared = 0  # of ``peak``, file-backed and shared-memory pages
        self.samples: list[int] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._stop_evt.is_set():
            if n % 20 == 0:
                self.pids = tree(self.pid)
            n += 1
            rss, shared = rss_and_shared(self.pids)
            self.samples.append(rss)
            if rss > self.peak:
                self.peak, self.peak_shared = rss, shared
            self._stop_evt.wait(self.every)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        return self.peak



def rss_parts(pids: Sequence[int]) -> dict[str, int]:
    """RssAnon, RssFile and RssShmem of ``pids`` summed, in bytes (/proc/<pid>/status)."""
    total = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    for pid in pids:
        for key, kib in status_kib(pid, tuple(total)).items():
            total[key] += kib * 1024
    return total


def file_share(base: tuple[int, int], peak: tuple[int, int]) -> tuple[int, int]:
    """Split an RSS growth ``peak - base`` (each ``(rss, file and shared pages)``) into (the
    growth of file-backed pages, the rest), in bytes.

    The as-shipped gateway's only growing file mapping is its LMDB store: answers stored during
    the run become page-cache pages of the store file, mapped by the workers that read them
    (clean pages the kernel can reclaim; their bound is the cache's). The rest — anonymous
    memory, the L1 entries of the answers stored included — is what the SSE scenario compares
    with nginx's as the memory the open streams add.
    """
    added = peak[0] - base[0]
    file_pages = min(max(0, peak[1] - base[1]), max(0, added))
    return file_pages, added - file_pages
