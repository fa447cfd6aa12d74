#!/usr/bin/env python3
"""Soak benchmark: hundreds of thousands of mixed requests while watching the gateway's memory.

    scripts/soak                          # 200,000 requests (at most 30 minutes)
    scripts/soak --requests 50000 --duration 600 --concurrency 32 --seed 7

Starts two mock LLM backends (``python -m mock_llm``) and the gateway in front of them with two
workers (plain HTTP, free loopback ports, a small cache so it reaches its bound early), then
sends a seeded mix of requests from one gevent client process:

=============  ===============================================================================
hit            one of 64 fixed chat prompts: served from the cache after the first time
miss           a unique chat prompt: goes to a backend, then stored (evicting older entries)
stream-hit     one of 32 fixed streamed prompts: replayed from the cache
stream-miss    a unique streamed prompt: relayed event by event, must end with ``data: [DONE]``
plain          ``GET /v1/models`` or ``/echo/...``: not cacheable (BYPASS)
abort          a slow stream the client leaves after its first event
fault-500      ``X-Mock-Status: 500``: the backend's error must pass through unchanged
fault-break    ``X-Mock-Break-After: 2``: the stream must reach the client broken (no terminator)
own            the gateway's ``/health``, ``/metrics``, ``/cache/stats``
bad-json       invalid JSON to an API path: 400 from the gateway
=============  ===============================================================================

Every second or two it samples the resident memory (``/proc/<pid>/status`` VmRSS) of the
master and of every worker. At the end it prints RSS per process at start (before any load),
after warm-up (``--warmup``, 20 % of the requests), in the middle and at the end, the growth after warm-up,
and the counts of requests and of outcomes by cause: injected faults that behaved as they
should are not errors; anything else (unexpected status, broken answer, exception) is.
Exit status 0 when there were no unexpected errors, no worker was replaced and no worker grew
more than ``--max-growth-mb`` (anonymous RSS) after warm-up; else 1.

Everything it starts is stopped by PID at the end (also on Ctrl-C). Logs go to a temporary
folder that is printed (kept with ``--keep-logs``). Not a CI test: it takes minutes.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.pool

from tools.procs import Child, children_of, clean_env, free_port, http_ok, rss_kib, wait_until

MIX = {  # kind: weight
    "hit": 30, "miss": 18, "stream-hit": 8, "stream-miss": 10, "plain": 12, "abort": 5,
    "fault-500": 5, "fault-break": 5, "own": 4, "bad-json": 3,
}
HIT_PROMPTS = 64
STREAM_HIT_PROMPTS = 32
JSON_HEADERS = {"Content-Type": "application/json"}


# ----------------------------------------------------------------------------- processes


# ----------------------------------------------------------------------------- load


@dataclass
class Tally:
    sent: int = 0
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    cache: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def ok(self, kind: str, what: str = "ok") -> None:
        self.outcomes[(kind, what)] += 1

    def error(self, kind: str, cause: str, detail: str = "") -> None:
        self.outcomes[(kind, "ERROR " + cause)] += 1
        self.errors[cause] += 1
        self.examples.setdefault(cause, f"{kind}: {detail}"[:300])


def chat(content: str, stream: bool = False) -> bytes:
    return json.dumps({"model": "mock-model", "stream": stream,
                       "messages": [{"role": "user", "content": content}]}).encode()


class Client:
    """One keep-alive connection to the gateway, used by one greenlet."""

    def __init__(self, port: int, tally: Tally, rnd: random.Random) -> None:
        self.port, self.tally, self.rnd = port, tally, rnd
        self.conn: http.client.HTTPConnection | None = None

    def _conn(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return self.conn

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def exchange(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            self._drop()
            raise
        if resp.will_close:
            self._drop()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def one(self, kind: str) -> None:
        t = self.tally
        t.by_kind[kind] += 1
        try:
            getattr(self, "do_" + kind.replace("-", "_"))(kind)
        except http.client.IncompleteRead as exc:
            t.error(kind, "incomplete body", repr(exc)[:200])
        except TimeoutError:
            t.error(kind, "client timeout (30 s)")
        except http.client.RemoteDisconnected as exc:
            t.error(kind, "connection closed without an answer", str(exc))
        except ConnectionError as exc:
            t.error(kind, f"connection error {type(exc).__name__}", str(exc))
        except Exception as exc:  # noqa: BLE001 - counted, not fatal
            t.error(kind, f"exception {type(exc).__name__}", str(exc))

    # --- kinds
    def _chat(self, kind: str, body: bytes, stream: bool) -> None:
        status, headers, data = self.exchange("POST", "/v1/chat/completions", body, JSON_HEADERS)
        self.tally.cache[headers.get("x-cache", "-")] += 1
        if status != 200:
            self.tally.error(kind, f"status {status}", data[:200].decode("latin-1"))
        elif stream and not data.endswith(b"data: [DONE]\n\n"):
            self.tally.error(kind, "stream without [DONE]", data[-200:].decode("latin-1"))
        elif not stream and b'"choices"' not in data:
            self.tally.error(kind, "answer without choices", data[:200].decode("latin-1"))
        else:
            self.tally.ok(kind, headers.get("x-cache", "?"))

    def do_hit(self, kind: str) -> None:
        self._chat(kind, chat(f"soak fixed prompt {self.rnd.randrange(HIT_PROMPTS)}"), False)

    def do_miss(self, kind: str) -> None:
        self._chat(kind, chat(f"soak unique {uuid.uuid4()}"), False)

    def do_stream_hit(self, kind: str) -> None:
        self._chat(kind, chat(f"soak fixed stream {self.rnd.randrange(STREAM_HIT_PROMPTS)}", True), True)

    def do_stream_miss(self, kind: str) -> None:
        self._chat(kind, chat(f"soak unique stream {uuid.uuid4()}", True), True)

    def do_plain(self, kind: str) -> None:
        if self.rnd.random() < 0.5:
            status, _, data = self.exchange("GET", "/v1/models")
        else:
            status, _, data = self.exchange("POST", f"/echo/soak/{self.rnd.randrange(1000)}?q=1", b"x" * 512)
        if status == 200:
            self.tally.ok(kind)
        else:
            self.tally.error(kind, f"status {status}", data[:200].decode("latin-1"))

    def do_own(self, kind: str) -> None:
        path = self.rnd.choice(["/health", "/metrics", "/cache/stats", "/metrics?format=prometheus"])
        status, _, data = self.exchange("GET", path)
        if status == 200:
            self.tally.ok(kind)
        else:
            self.tally.error(kind, f"status {status} on {path}", data[:200].decode("latin-1"))

    def do_bad_json(self, kind: str) -> None:
        status, _, data = self.exchange("POST", "/v1/chat/completions", b'{"model": "m", "messages": [',
                                        JSON_HEADERS)
        if status == 400 and b'"error"' in data:
            self.tally.ok(kind, "400")
        else:
            self.tally.error(kind, f"status {status} for invalid JSON", data[:200].decode("latin-1"))

    def do_fault_500(self, kind: str) -> None:
        status, headers, data = self.exchange("POST", "/v1/chat/completions", chat(f"soak fault {uuid.uuid4()}"),
                                              {**JSON_HEADERS, "X-Mock-Status": "500"})
        if status == 500 and "x-mock-instance" in headers:
            self.tally.ok(kind, "500 passed through")
        else:
            self.tally.error(kind, f"status {status} for an injected 500", data[:200].decode("latin-1"))

    def do_fault_break(self, kind: str) -> None:
        conn = self._conn()
        try:
            conn.request("POST", "/v1/chat/completions", body=chat(f"soak break {uuid.uuid4()}", True),
                         headers={**JSON_HEADERS, "X-Mock-Break-After": "2"})
            resp = conn.getresponse()
            status = resp.status
            try:
                data = resp.read()
            except (http.client.IncompleteRead, ConnectionError):
                self._drop()
                self.tally.ok(kind, "broken as injected")
                return
        except BaseException:
            self._drop()
            raise
        self._drop()
        self.tally.error(kind, f"injected break reached the client whole (status {status})",
                         data[-200:].decode("latin-1"))

    def do_abort(self, kind: str) -> None:
        body = chat(f"soak abort {uuid.uuid4()}", True)
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                f"X-Mock-Tokens: 40\r\nX-Mock-Token-Delay: 0.02\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(head + body)
            got = b""
            while b"data: " not in got:
                chunk = s.recv(65536)
                if not chunk:
                    self.tally.error(kind, "closed before the first event", got[:200].decode("latin-1"))
                    return
                got += chunk
        if got.startswith(b"HTTP/1.1 200"):
            self.tally.ok(kind, "left after the first event")
        else:
            self.tally.error(kind, "abort target not a 200 stream", got[:200].decode("latin-1"))


# ----------------------------------------------------------------------------- memory


@dataclass
class Sample:
    elapsed: float
    done: int
    rss: dict[int, tuple[int, int]]  # pid -> (VmRSS, RssAnon) in KiB


class Sampler:
    def __init__(self, master: int, tally: Tally, every: float) -> None:
        self.master, self.tally, self.every = master, tally, every
        self.samples: list[Sample] = []
        self.workers_seen: set[int] = set()
        self.started = time.monotonic()
        self._greenlet: gevent.Greenlet | None = None

    def take(self) -> Sample:
        workers = children_of(self.master)
        self.workers_seen.update(workers)
        rss = {pid: kib for pid in [self.master, *workers] if (kib := rss_kib(pid)) is not None}
        done = sum(self.tally.by_kind.values())
        sample = Sample(time.monotonic() - self.started, done, rss)
        self.samples.append(sample)
        return sample

    def start(self) -> None:
        def loop() -> None:
            while True:
                gevent.sleep(self.every)
                self.take()
        self._greenlet = gevent.spawn(loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
        self.take()

    def at_done(self, done: int) -> Sample:
        return next((s for s in self.samples if s.done >= done), self.samples[-1])


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    folder = tempfile.mkdtemp(prefix="ntonix-soak-")
    py = sys.executable
    children: list[Child] = []
    try:
        mocks = []
        for name in ("soak-a", "soak-b"):
            port = free_port()
            child = Child(name, [py, "-m", "mock_llm", "--port", str(port), "--name", name, "--tokens",
                                 str(args.tokens)], os.path.join(folder, f"{name}.log"), clean_env())
            children.append(child)
            mocks.append((port, child))
        for port, child in mocks:
            wait_until(f"{child.name} answering", lambda: http_ok(port, "/health"), child)  # noqa: B023 - called now
        gw_port = free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": gw_port, "ssl_port": 0, "threads": args.workers},
            "backends": [{"host": "127.0.0.1", "port": port, "weight": 1} for port, _ in mocks],
            "cache": {"enabled": True, "max_size_mb": args.cache_mb, "dir": os.path.join(folder, "cache")},
            # Injected 500s and breaks are failures too; the soak is about memory, not ejection.
            "circuit_breaker": {"failure_threshold": 1000, "cooldown_s": 1},
            "health": {"interval_s": 1},
            "logging": {"level": "warning"},
        }
        config_path = os.path.join(folder, "ntonix.json")
        with open(config_path, "w") as fh:
            json.dump(config, fh, indent=2)
        gateway = Child("gateway", [py, "-m", "ntonix", "--config", config_path], os.path.join(folder, "gateway.log"),
                        clean_env())
        children.append(gateway)
        wait_until("the gateway answering", lambda: http_ok(gw_port, "/health"), gateway)
        deadline = time.monotonic() + 30
        while len(children_of(gateway.pid)) < args.workers and time.monotonic() < deadline:
            time.sleep(0.1)
        workers_at_start = children_of(gateway.pid)

        print(f"soak: {args.requests} requests (at most {args.duration:g} s), concurrency {args.concurrency}, "
              f"gateway pid {gateway.pid} on port {gw_port}, workers {workers_at_start}, logs in {folder}",
              flush=True)
        tally = Tally()
        sampler = Sampler(gateway.pid, tally, args.sample_every)
        sampler.take()
        sampler.start()
        rnd = random.Random(args.seed)
        kinds, weights = zip(*MIX.items(), strict=True)
        plan = iter(rnd.choices(kinds, weights=weights, k=args.requests))
        started = time.monotonic()
        stop_at = started + args.duration
        progress_every = max(1, args.requests // 20)

        def worker(i: int) -> None:
            client = Client(gw_port, tally, random.Random(args.seed * 1000 + i))
            for kind in plan:
                if time.monotonic() > stop_at:
                    return
                client.one(kind)
                tally.sent += 1
                if tally.sent % progress_every == 0:
                    el = time.monotonic() - started
                    print(f"  {tally.sent:>8} requests  {el:7.1f} s  {tally.sent / el:7.0f}/s  "
                          f"errors {sum(tally.errors.values())}", flush=True)

        pool = gevent.pool.Pool(args.concurrency)
        for i in range(args.concurrency):
            pool.spawn(worker, i)
        pool.join()
        elapsed = time.monotonic() - started
        gevent.sleep(1.0)  # let the workers settle (aborted streams closing, cache writes)
        sampler.stop()
        workers_at_end = children_of(gateway.pid)
        metrics = None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", gw_port, timeout=10)
            conn.request("GET", "/metrics")
            metrics = json.loads(conn.getresponse().read())
            conn.request("GET", "/cache/stats")
            cache_stats = json.loads(conn.getresponse().read())
            conn.close()
        except (OSError, ValueError):
            cache_stats = None
        with open(gateway.log_path, "rb") as log_fh:
            log_events: collections.Counter[str] = collections.Counter()
            for line in log_fh.read().decode(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    if "Traceback" in line:
                        log_events["(traceback)"] += 1
                    continue
                if isinstance(rec, dict):
                    log_events[f"{rec.get('level', '?')} {rec.get('message', rec.get('event', '?'))}"] += 1
        return report(args, tally, sampler, elapsed, workers_at_start, workers_at_end, metrics, cache_stats,
                      log_events)
    finally:
        for child in reversed(children):
            child.stop()
        if args.keep_logs:
            print(f"logs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def report(args: argparse.Namespace, tally: Tally, sampler: Sampler, elapsed: float, workers_at_start: list[int],
           workers_at_end: list[int], metrics: Any, cache_stats: Any, log_events: collections.Counter[str]) -> int:
    total = sum(tally.by_kind.values())
    errors = sum(tally.errors.values())
    print(f"\n== {total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s), {errors} unexpected errors")
    print("\n-- requests by kind and outcome")
    for kind in MIX:
        outs = {o: n for (k, o), n in tally.outcomes.items() if k == kind}
        print(f"  {kind:<12} {tally.by_kind[kind]:>8}   " + ", ".join(f"{o}: {n}" for o, n in sorted(outs.items())))
    print("  X-Cache on chat answers: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.cache.items())))
    print("\n-- unexpected errors by cause" + ("" if tally.errors else ": none"))
    for cause, n in tally.errors.most_common():
        print(f"  {n:>8}  {cause}   e.g. {tally.examples.get(cause, '')}")

    warm = sampler.at_done(int(total * args.warmup))
    middle = sampler.at_done(total // 2)
    first, last = sampler.samples[0], sampler.samples[-1]
    pids = [sampler.master, *sorted(sampler.workers_seen)]
    worst = {0: 0.0, 1: 0.0}
    for which, title in ((0, "RSS (VmRSS)"), (1, "anonymous RSS (RssAnon: heap, no mapped files)")):
        print(f"\n-- {title} in MiB (samples every {args.sample_every:g} s: {len(sampler.samples)})")
        print(f"  {'process':<16}{'start':>9}{'warm-up':>9}{'middle':>9}{'end':>9}{'max':>9}{'end-warm':>10}")
        for pid in pids:
            name = "master" if pid == sampler.master else "worker"

            def mib(sample: Sample, pid: int = pid, which: int = which) -> str:
                kib = sample.rss.get(pid)
                return f"{kib[which] / 1024:9.1f}" if kib is not None else f"{'-':>9}"

            peak = max((s.rss[pid][which] for s in sampler.samples if pid in s.rss), default=0) / 1024
            growth = ""
            if pid in warm.rss and pid in last.rss:
                g = (last.rss[pid][which] - warm.rss[pid][which]) / 1024
                growth = f"{g:+10.1f}"
                if pid != sampler.master:
                    worst[which] = max(worst[which], g)
            print(f"  {name + ' ' + str(pid):<16}{mib(first)}{mib(warm)}{mib(middle)}{mib(last)}{peak:9.1f}{growth}")
    print(f"  (start = before any load; warm-up = after {warm.done} requests, {warm.elapsed:.0f} s; "
          f"middle = {middle.done}, {middle.elapsed:.0f} s; end = {last.done}, {last.elapsed:.0f} s)")
    replaced = workers_at_start != workers_at_end
    print(f"  workers at start {workers_at_start}, at end {workers_at_end}"
          + ("  <-- REPLACED" if replaced else " (same)"))
    if metrics is not None:
        print(f"\n-- gateway /metrics: requests_total {metrics.get('requests_total')}, "
              f"cache_hits {metrics.get('cache_hits')}, cache_misses {metrics.get('cache_misses')}, "
              f"memory_rss_bytes {metrics.get('memory_rss_bytes')}")
        for b in metrics.get("backends", []):
            print(f"   backend {b.get('address')}: {b.get('state')}, requests {b.get('requests')}, "
                  f"errors {b.get('errors')}")
    if cache_stats is not None:
        print(f"-- gateway /cache/stats: entries {cache_stats.get('entries')}, size_bytes "
              f"{cache_stats.get('size_bytes')}, evictions {cache_stats.get('evictions')}")
    print("\n-- gateway log lines (level, event)" + ("" if log_events else ": none"))
    for event, n in log_events.most_common(15):
        print(f"  {n:>8}  {event}")
    ok = errors == 0 and not replaced and worst[1] <= args.max_growth_mb
    print(f"\n== {'PASS' if ok else 'FAIL'}: unexpected errors {errors}, workers replaced {replaced}, "
          f"largest worker growth after warm-up: RSS {worst[0]:+.1f} MiB, anonymous RSS {worst[1]:+.1f} MiB "
          f"(limit {args.max_growth_mb:g})")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200_000, help="requests to send (default 200000)")
    p.add_argument("--duration", type=float, default=1800.0, help="stop after this many seconds (default 1800)")
    p.add_argument("--concurrency", type=int, default=32, help="client connections at once (default 32)")
    p.add_argument("--workers", type=int, default=2, help="gateway worker processes (default 2)")
    p.add_argument("--tokens", type=int, default=8, help="tokens per mock answer (default 8)")
    p.add_argument("--cache-mb", type=float, default=8.0,
                   help="cache.max_size_mb (default 8: full, and evicting, well before the warm-up ends)")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="share of the requests counted as warm-up (default 0.2)")
    p.add_argument("--sample-every", type=float, default=2.0, help="RSS sampling interval in s (default 2)")
    p.add_argument("--max-growth-mb", type=float, default=10.0,
                   help="largest acceptable growth of a worker's anonymous RSS after warm-up (default 10)")
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary log folder")
    args = p.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.duration <= 0:
        p.error("--requests, --concurrency and --duration must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
