#!/usr/bin/env python3
"""CPU cost of one pool reuse: acquire + return of an idle keep-alive socket (issue 13).

    python -m tools.bench.pool                          # this checkout
    python -m tools.bench.pool --against ../other-tree  # and another checkout's transport module

In one process, on one loopback connection to a gevent listener: ``--rounds`` rounds of ``--cycles``
cycles each, the checkouts alternating round by round; prints the median CPU µs per cycle.
It isolates what scripts/bench cannot resolve on a shared machine: the liveness check a pooled
socket gets before every reuse. Not part of the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import gevent
import gevent.server

from ntonix.upstream import transport


def load(tree: Path) -> ModuleType:
    path = tree / "ntonix" / "upstream" / "transport.py"
    if not path.exists():  # a checkout from before the package layout
        path = tree / "ntonix" / "transport.py"
    spec = importlib.util.spec_from_file_location("other_transport", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cycle_us(module: ModuleType, port: int, cycles: int) -> float:
    pool = module.Pool("127.0.0.1", port, size=2, max_size=4, idle_timeout_s=60, connect_timeout_s=1)
    sock, _ = pool.acquire()
    pool.return_socket(sock)
    started = time.process_time()
    for _ in range(cycles):
        sock, reused = pool.acquire()
        pool.return_socket(sock)
    spent = time.process_time() - started
    assert reused, "the pool opened a new connection: nothing measured"
    pool.close()
    return spent / cycles * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another checkout to compare with")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cycles", type=int, default=200_000)
    args = ap.parse_args()
    held: list[object] = []

    def hold(sock: object, _address: object) -> None:  # keep the connection open, say nothing
        held.append(sock)
        gevent.sleep(3600)

    server = gevent.server.StreamServer(("127.0.0.1", 0), hold)
    server.start()
    targets: list[tuple[str, ModuleType]] = [("this", transport)]
    if args.against:
        targets.append((str(args.against), load(args.against)))
    results: dict[str, list[float]] = {name: [] for name, _ in targets}
    for rnd in range(args.rounds):
        for name, module in targets if rnd % 2 == 0 else targets[::-1]:
            results[name].append(cycle_us(module, server.server_port, args.cycles))
    for name, values in results.items():
        print(f"{name}: {statistics.median(values):.2f} µs CPU per acquire + return "
              f"(median of {args.rounds}; {min(values):.2f}–{max(values):.2f})")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
