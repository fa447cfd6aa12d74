#!/usr/bin/env python3
"""Replay a workload of chat requests through an NTONIX gateway and report what the cache did.

    scripts/replay --gateway http://127.0.0.1:8080 --generate 1000 --unique 300 --concurrency 16 --seed 1
    scripts/replay --gateway http://127.0.0.1:8080 --trace trace.jsonl [--concurrency 16]

Two phases, one run:

1. **Trace.** Every request of the trace is sent once, in order, by ``--concurrency`` client
   threads (each with its own keep-alive connection) taking the next request as soon as they
   are free, so neighbouring requests are in flight together. Reported: requests, errors, hits
   (``X-Cache: HIT``, read from each response), hit rate, backend requests saved (= hits: each
   hit is an answer the backend did not compute), how many hits arrived while the first
   identical request was still in flight (coalesced), and the best hit rate possible for this
   trace, ``(N - unique) / N`` — every first occurrence of a request must reach a backend, every
   repeat could be a hit. Unique means: same path, same ``Authorization`` and the same JSON value
   of the body (key order and spacing ignored), i.e. the gateway's cache key.

2. **Added latency of a cache lookup on a miss.** ``--latency-probes P`` fresh requests (bodies
   of the trace with a new ``user`` field, so nothing is cached yet), sent one at a time on one
   keep-alive connection, each twice: once plainly (``MISS``: key, lookup in every tier,
   coalescing join, recording and storing the answer) and once with ``Cache-Control: no-store``
   (``BYPASS``: the gateway neither looks up nor stores, and does not coalesce). Both carry the
   same body, so the backend does the same work; the order within a pair alternates, so neither
   side systematically gets the warmer connection. Reported: p50/p99 of both, the differences of
   the p50s and of the p99s, and the median of the per-pair differences (the most robust
   figure: backend jitter is common to both sides of a pair). With a backend answering in a few
   milliseconds the difference is small and p99 is dominated by noise; more probes help.

Generated traces (``--generate N --unique U``): U distinct prompts, each sent at least once;
the N - U repeats follow a Zipf-like popularity (a few prompts are very popular). A share of the
repeated prompts (``--burst-fraction``, default 0.3) is sent as a burst — all its copies one
after the other — so that they arrive while the first is being answered (coalescing). A share
of the prompts (``--stream-fraction``) asks for ``"stream": true``. ``--seed`` fixes the trace.

Trace files are JSON Lines, one request per line: ``{"body": {...}, "path": "/v1/chat/completions",
"headers": {...}}`` (path and headers optional). ``--write-trace FILE`` saves a generated trace.

Every run salts the requests (``"user": "ntonix-replay-<salt>"``, ``--salt`` to choose it), so
a repeated run against the same gateway does not get hits from the run before and the hit rate
stays comparable with the best possible; ``--salt ""`` sends trace bodies unchanged.

Standard library only. ``--json`` prints the report as JSON on stdout (the summary goes to stderr).
Exit status 0, or 1 when no request of the trace succeeded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import queue
import random
import secrets
import ssl
import statistics
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PATH = "/v1/chat/completions"
TOPICS = ("the weather", "prime numbers", "a haiku", "Python generators", "HTTP caching", "sourdough",
          "the Roman empire", "quantum computing", "chess openings", "unit testing", "the moon landing")


@dataclass
class Request:
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def key(self) -> tuple[str, str, str]:
        auth = next((v for k, v in self.headers.items() if k.lower() == "authorization"), "")
        return self.path, json.dumps(self.body, sort_keys=True, separators=(",", ":")), auth


@dataclass
class Result:
    index: int
    status: int = 0
    cache: str = ""
    started: float = 0.0
    ended: float = 0.0
    error: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1000.0


# ----------------------------------------------------------------------------- traces


def generate(n: int, unique: int, seed: int, stream_fraction: float, burst_fraction: float,
             model: str) -> list[Request]:
    if not 1 <= unique <= n:
        raise SystemExit(f"replay: --unique must be between 1 and --generate ({n}), got {unique}")
    rng = random.Random(seed)
    prompts = []
    for i in range(unique):
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": f"Prompt {i}: tell me about {rng.choice(TOPICS)}."}],
            "max_tokens": rng.choice((8, 16, 32)),
        }
        if rng.random() < stream_fraction:
            body["stream"] = True
        prompts.append(body)
    # Zipf-like popularity for the repeats; every prompt is sent at least once.
    weights = [1.0 / (rank + 1) for rank in range(unique)]
    counts = [1] * unique
    for i in rng.choices(range(unique), weights=weights, k=n - unique):
        counts[i] += 1
    order = [i for i in range(unique) for _ in range(counts[i])]
    rng.shuffle(order)
    # Bursts: all copies of some repeated prompts back to back, at the first one's place.
    bursty = {i for i in range(unique) if counts[i] > 1 and rng.random() < burst_fraction}
    out: list[int] = []
    placed: set[int] = set()
    for i in order:
        if i in bursty:
            if i not in placed:
                placed.add(i)
                out.extend([i] * counts[i])
        else:
            out.append(i)
    return [Request(DEFAULT_PATH, json.loads(json.dumps(prompts[i]))) for i in out]


def load_trace(path: str) -> list[Request]:
    requests = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                requests.append(Request(str(item.get("path") or DEFAULT_PATH), dict(item["body"]),
                                        {str(k): str(v) for k, v in (item.get("headers") or {}).items()}))
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"replay: {path}:{lineno}: not a trace line ({exc})") from None
    if not requests:
        raise SystemExit(f"replay: {path}: no requests")
    return requests


def write_trace(path: str, requests: list[Request]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({"path": r.path, "body": r.body, "headers": r.headers}) + "\n")


def salted(body: dict[str, Any], salt: str) -> dict[str, Any]:
    if not salt:
        return body
    return {**body, "user": f"{body['user']}|{salt}" if "user" in body else salt}


# ----------------------------------------------------------------------------- HTTP


class Client:
    """One keep-alive connection to the gateway, reopened after an error."""

    def __init__(self, url: str, timeout: float, insecure: bool) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SystemExit(f"replay: --gateway must be http(s)://host:port, got {url!r}")
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self.context = ssl._create_unverified_context() if insecure else ssl.create_default_context()
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.conn is None:
            if self.https:
                self.conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                        context=self.context)
            else:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, str, bytes]:
        """(status, X-Cache, body); raises OSError / HTTPException after closing the connection."""
        conn = self._connect()
        try:
            conn.request(method, self.prefix + path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.will_close:
                self.close()
            return resp.status, resp.getheader("X-Cache", ""), data
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def post(self, req: Request, extra: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        headers = {"Content-Type": "application/json", **req.headers, **(extra or {})}
        return self.send("POST", req.path, json.dumps(req.body).encode(), headers)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def cache_stats(args: argparse.Namespace) -> dict[str, Any] | None:
    client = Client(args.gateway, 10.0, args.insecure)
    try:
        status, _, body = client.send("GET", "/cache/stats", None, {})
        return json.loads(body) if status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        client.close()


# ----------------------------------------------------------------------------- phase 1: the trace


def run_trace(args: argparse.Namespace, requests: list[Request]) -> list[Result]:
    results = [Result(i) for i in range(len(requests))]
    todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for i in range(len(requests)):
        todo.put(i)
    threads = max(1, min(args.concurrency, len(requests)))
    for _ in range(threads):
        todo.put(None)

    def worker() -> None:
        client = Client(args.gateway, args.timeout, args.insecure)
        try:
            while (i := todo.get()) is not None:
                r = results[i]
                r.started = time.perf_counter()
                try:
                    r.status, r.cache, _ = client.post(requests[i])
                    if r.status != 200:
                        r.error = f"HTTP {r.status}"
                except (OSError, http.client.HTTPException) as exc:
                    r.error = f"{type(exc).__name__}: {exc}"
                r.ended = time.perf_counter()
        finally:
            client.close()

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


def summarise_trace(requests: list[Request], results: list[Result], wall_s: float) -> dict[str, Any]:
    n = len(requests)
    keys = [r.key() for r in requests]
    unique = len(set(keys))
    hits = sum(1 for r in results if r.cache == "HIT")
    # A hit while the first (missing) request of its key was still in flight was coalesced.
    first_miss: dict[tuple[str, str, str], Result] = {}
    for key, r in sorted(zip(keys, results, strict=True), key=lambda kr: kr[1].started):
        if r.cache == "MISS" and key not in first_miss:
            first_miss[key] = r
    coalesced = sum(1 for key, r in zip(keys, results, strict=True)
                    if r.cache == "HIT" and key in first_miss and r.started < first_miss[key].ended)
    counts = {c: sum(1 for r in results if r.cache == c) for c in ("HIT", "MISS", "BYPASS")}
    latencies = [r.latency_ms for r in results if not r.error]
    return {
        "requests": n,
        "unique": unique,
        "streamed": sum(1 for r in requests if r.body.get("stream") is True),
        "errors": sum(1 for r in results if r.error),
        "hits": hits,
        "misses": counts["MISS"],
        "bypasses": counts["BYPASS"],
        "hit_rate": round(hits / n, 4),
        "best_hit_rate": round((n - unique) / n, 4),
        "backend_requests": n - hits,
        "backend_requests_saved": hits,
        "coalesced_hits": coalesced,
        "wall_s": round(wall_s, 3),
        "latency_ms": percentiles(latencies),
    }


# ----------------------------------------------------------------------------- phase 2: lookup latency


def run_probes(args: argparse.Namespace, requests: list[Request], salt: str) -> dict[str, Any]:
    n = args.latency_probes
    distinct = list({r.key(): r for r in requests}.values())
    client = Client(args.gateway, args.timeout, args.insecure)
    miss: list[float] = []
    bypass: list[float] = []
    pairs: list[float] = []
    discarded = 0
    warmup = min(5, n)
    tag = salt or secrets.token_hex(6)
    try:
        for j in range(-warmup, n):
            base = distinct[j % len(distinct)]
            req = Request(base.path, salted(base.body, f"probe-{tag}-{j}"), base.headers)
            timed: dict[str, float] = {}
            seen: dict[str, str] = {}
            for kind in (("miss", "bypass") if j % 2 == 0 else ("bypass", "miss")):
                extra = {"Cache-Control": "no-store"} if kind == "bypass" else {}
                t0 = time.perf_counter()
                try:
                    status, xcache, _ = client.post(req, extra)
                except (OSError, http.client.HTTPException):
                    status, xcache = 0, ""
                timed[kind] = (time.perf_counter() - t0) * 1000.0
                seen[kind] = xcache if status == 200 else f"error {status}"
            if j < 0:
                continue  # warm-up: connections, code paths
            if seen != {"miss": "MISS", "bypass": "BYPASS"}:
                discarded += 1
                continue
            miss.append(timed["miss"])
            bypass.append(timed["bypass"])
            pairs.append(timed["miss"] - timed["bypass"])
    finally:
        client.close()
    pm, pb = percentiles(miss), percentiles(bypass)
    return {
        "probes": len(pairs),
        "warmup_pairs": warmup,
        "discarded": discarded,
        "miss_ms": pm,
        "bypass_ms": pb,
        "added_ms": {
            "p50": round(pm["p50"] - pb["p50"], 3) if pairs else None,
            "p99": round(pm["p99"] - pb["p99"], 3) if pairs else None,
            "median_of_pair_differences": round(statistics.median(pairs), 3) if pairs else None,
        },
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(values)

    def pct(p: float) -> float:  # nearest rank
        return round(s[max(0, math.ceil(p / 100 * len(s)) - 1)], 3)

    return {"p50": pct(50), "p99": pct(99), "max": round(s[-1], 3)}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/replay", description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", required=True, help="gateway base URL, e.g. http://127.0.0.1:8080")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", metavar="FILE", help="JSON Lines trace: {body, path?, headers?} per line")
    src.add_argument("--generate", type=int, metavar="N", help="generate a trace of N requests")
    p.add_argument("--unique", type=int, metavar="U", help="distinct requests in a generated trace (default N/3)")
    p.add_argument("--concurrency", type=int, default=8, metavar="C", help="client threads (default 8)")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="seed of a generated trace (default 1)")
    p.add_argument("--stream-fraction", type=float, default=0.0, metavar="F",
                   help="share of generated prompts with \"stream\": true (default 0)")
    p.add_argument("--burst-fraction", type=float, default=0.3, metavar="F",
                   help="share of repeated generated prompts sent as back-to-back bursts (default 0.3)")
    p.add_argument("--model", default="mock-model", help="model of generated requests")
    p.add_argument("--latency-probes", type=int, default=200, metavar="P",
                   help="MISS/BYPASS pairs for the lookup latency (default 200; 0 = skip)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra header on every request of the trace phase, not the probes (repeatable)")
    p.add_argument("--salt", default=None, help="salt for the requests (default: random per run; '' = none)")
    p.add_argument("--write-trace", metavar="FILE", help="save the (generated) trace as JSON Lines")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    p.add_argument("--insecure", action="store_true", help="https: do not verify the certificate")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if not 0.0 <= args.stream_fraction <= 1.0:
        p.error("--stream-fraction must be between 0 and 1")
    if args.generate is not None and args.generate < 1:
        p.error("--generate must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trace:
        requests = load_trace(args.trace)
        source = args.trace
    else:
        unique = args.unique if args.unique is not None else max(1, args.generate // 3)
        requests = generate(args.generate, unique, args.seed, args.stream_fraction, args.burst_fraction, args.model)
        source = f"generated: N={args.generate} unique={unique} seed={args.seed} " \
                 f"stream_fraction={args.stream_fraction} burst_fraction={args.burst_fraction}"
    if args.write_trace:
        write_trace(args.write_trace, requests)
    extra: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"replay: --header must be 'Name: value', got {h!r}")
        extra[name.strip()] = value.strip()
    salt = secrets.token_hex(6) if args.salt is None else args.salt
    sent = [Request(r.path, salted(r.body, f"ntonix-replay-{salt}" if salt else ""), {**r.headers, **extra})
            for r in requests]

    stats_before = cache_stats(args)
    t0 = time.perf_counter()
    results = run_trace(args, sent)
    trace = summarise_trace(sent, results, time.perf_counter() - t0)
    stats_after = cache_stats(args)
    gateway = None
    if stats_before and stats_after:
        gateway = {k: stats_after[k] - stats_before[k] for k in ("hits", "misses", "entries", "evictions")
                   if isinstance(stats_after.get(k), int) and isinstance(stats_before.get(k), int)}
    # The probes carry the trace's own headers, not --header (e.g. a mock's delay for the trace).
    probes = [Request(r.path, salted(r.body, f"ntonix-replay-{salt}" if salt else ""), dict(r.headers))
              for r in requests]
    latency = run_probes(args, probes, salt) if args.latency_probes > 0 else None
    report = {"gateway": args.gateway, "source": source, "concurrency": args.concurrency, "trace": trace,
              "cache_stats_delta": gateway, "lookup_latency": latency}
    errors = [r.error for r in results if r.error]

    out = sys.stderr if args.json else sys.stdout
    print(render(report, errors[:5]), file=out)
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if trace["errors"] == trace["requests"] else 0


def render(report: dict[str, Any], errors: list[str]) -> str:
    t = report["trace"]
    lines = [
        f"trace: {report['source']}",
        f"gateway: {report['gateway']}  concurrency: {report['concurrency']}",
        f"requests: {t['requests']} ({t['streamed']} streamed), unique: {t['unique']}, errors: {t['errors']}, "
        f"wall: {t['wall_s']} s",
        f"hits: {t['hits']}  misses: {t['misses']}  bypasses: {t['bypasses']}",
        f"hit rate: {t['hit_rate']:.1%}   best possible: {t['best_hit_rate']:.1%}   "
        f"(of the hits, {t['coalesced_hits']} arrived while the first identical request was in flight)",
        f"backend requests: {t['backend_requests']}   saved: {t['backend_requests_saved']} "
        f"({t['backend_requests_saved'] / t['requests']:.1%} of the load)",
        f"latency per request (ms): p50 {t['latency_ms']['p50']}  p99 {t['latency_ms']['p99']}",
    ]
    if report["cache_stats_delta"] is not None:
        lines.append(f"gateway /cache/stats delta: {report['cache_stats_delta']}")
    lat = report["lookup_latency"]
    if lat is not None:
        a = lat["added_ms"]
        lines += [
            f"cache lookup on a miss, {lat['probes']} MISS/BYPASS pairs ({lat['discarded']} discarded):",
            f"  MISS   p50 {lat['miss_ms']['p50']} ms  p99 {lat['miss_ms']['p99']} ms",
            f"  BYPASS p50 {lat['bypass_ms']['p50']} ms  p99 {lat['bypass_ms']['p99']} ms",
            f"  added  p50 {a['p50']} ms  p99 {a['p99']} ms  "
            f"(median of pair differences {a['median_of_pair_differences']} ms)",
        ]
    lines += [f"error: {e}" for e in errors]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
