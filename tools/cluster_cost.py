"""What cross-gateway coalescing (ntonix/cluster/flights.py) adds to a cache miss, in CPU µs.

    .venv/bin/python -m tools.cluster_cost [--misses 5000] [--chunks 1] [--gevent]

Starts its own redis-server on a free loopback port (stopped by PID at the end) and times,
with ``time.process_time`` (this process's CPU, so other load on the machine matters less
than for wall time), a miss nobody follows: ``join`` + ``publish_head`` + ``--chunks``
``publish_chunk`` + ``finish``, against the same loop with no cluster at all; and the local
LMDB coalescer's miss (ntonix/cache/coalescer.py) for scale. redis-server's own CPU is reported apart
(it is another process, usually on another host). Compare with the gateway's CPU per miss in
docs/performance.md (scenario 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _per_miss(fn: Callable[[int], None], n: int) -> float:
    fn(min(n, 200))  # warm: connections, script cache
    t = time.process_time()
    fn(n)
    return (time.process_time() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--misses", type=int, default=5000)
    ap.add_argument("--chunks", type=int, default=1, help="body chunks per answer (1: JSON, 50: a stream)")
    ap.add_argument("--gevent", action="store_true", help="monkey-patch first, as in the gateway's workers")
    ap.add_argument("--no-keeper", action="store_true", help="no keeper: every finish is its own round trip")
    args = ap.parse_args()
    if args.gevent:
        from gevent import monkey

        monkey.patch_all()
    from ntonix.cache.coalescer import Coalescer
    from ntonix.cache.coalescer import Follower as LocalFollower
    from ntonix.cache.coalescer import Leader as LocalLeader
    from ntonix.cache.remote import PREFIX, RedisStore
    from ntonix.cluster.flights import Flights, Leader
    from ntonix.cluster.follower import Follower

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    port = _free_port()
    folder = tempfile.mkdtemp(prefix="ntonix-cost-")
    redis_proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                   "no", "--dir", folder], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        if args.gevent:
            import gevent

            spawn: Callable[[Callable[[], None]], object] = gevent.spawn
        else:
            import threading

            def spawn(fn: Callable[[], None]) -> object:
                threading.Thread(target=fn, daemon=True).start()
                return None

        # As in a gateway: the keeper renews leases and sends finishes in batches.
        flights = Flights(f"redis://127.0.0.1:{port}/0", spawn=None if args.no_keeper else spawn)
        if args.gevent:  # as a worker's Runtime.start sets it: gevent's locks, taken once followed
            import gevent.lock

            flights.lock, flights.cooperative = gevent.lock.RLock, True
        local = Coalescer(folder, sleep=time.sleep)
        head = (200, (("Content-Type", "application/json"),))
        chunk = b"x" * 200
        counter = [0]

        def answer(leader: Leader | LocalLeader | Follower | LocalFollower) -> None:
            assert not isinstance(leader, Follower | LocalFollower), "nobody else asks: always a leader"
            leader.publish_head(*head)
            for _ in range(args.chunks):
                leader.publish_chunk(chunk)
            leader.finish(True)

        def cluster(n: int) -> None:
            for _ in range(n):
                counter[0] += 1
                answer(flights.join(f"key{counter[0]}"))
            flights.flush()  # the batch still queued counts too

        def lmdb(n: int) -> None:
            for _ in range(n):
                counter[0] += 1
                answer(local.join(f"key{counter[0]}"))

        def nothing(n: int) -> None:
            for _ in range(n):
                counter[0] += 1
                answer(Leader(flights, f"key{counter[0]}", None))

        store = RedisStore(f"redis://127.0.0.1:{port}/0", ttl_s=60)

        def recheck(n: int) -> None:  # what a miss does today after joining: the Redis tier's GET
            for _ in range(n):
                counter[0] += 1
                store.get(f"key{counter[0]}")
                answer(Leader(flights, f"key{counter[0]}", None))

        def merged(n: int) -> None:  # the re-check and the cluster join in one round trip
            for _ in range(n):
                counter[0] += 1
                role = flights.join_or_hit(f"key{counter[0]}", PREFIX + f"key{counter[0]}")
                assert not isinstance(role, bytes | Follower)
                answer(role)
            flights.flush()

        base = _per_miss(nothing, args.misses)
        today = _per_miss(recheck, args.misses)
        both = _per_miss(merged, args.misses)
        r0 = _proc_cpu(redis_proc.pid)
        c = _per_miss(cluster, args.misses)
        redis_us = (_proc_cpu(redis_proc.pid) - r0) / (args.misses + min(args.misses, 200)) * 1e6
        lm = _per_miss(lmdb, args.misses)
        assert flights.stats["alone"] == 0, flights.stats
        print(f"misses {args.misses}, chunks/answer {args.chunks}, gevent {args.gevent}, "
              f"keeper {not args.no_keeper} (finishes batched: {flights.stats['batched_finishes']})")
        print(f"  gateway-side CPU per miss, no cluster:        {base:8.1f} µs")
        print(f"  gateway-side CPU per miss, cluster (Redis):   {c:8.1f} µs  (+{c - base:.1f} µs)")
        print(f"  gateway-side CPU per miss, local LMDB join:   {lm:8.1f} µs  (+{lm - base:.1f} µs)")
        print(f"  redis-server CPU per miss (another process):  {redis_us:8.1f} µs")
        print("with the Redis cache tier (cache.redis_url), which re-checks the cache after the join:")
        print(f"  today: the re-check (redis-py GET):           {today:8.1f} µs")
        print(f"  re-check and cluster join in one round trip:  {both:8.1f} µs  ({both - today:+.1f} µs)")
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
