"""What the cache, coalescing and the access log add to a cache miss, in CPU µs, in process.

    .venv/bin/python -m tools.miss_cost [--requests 4000] [--rounds 7] [--batch 16]

The bench (``scripts/bench``) measures whole processes under wrk on a shared VM, where the
ratio of as shipped to stripped moves by ±15 % from round to round: too coarse to see a change
of 2 % of a miss. This drives one worker's ``Gateway`` directly, as the worker does
(``cached_hit`` first, then the WSGI call, the body read, ``close``), over a scripted backend
(``ntonix.upstream.fake``: no sockets), with unique prompts, so every request is a miss. Two
gateways, *shipped* (the defaults: cache, coalescing, access log to a file) and *stripped*
(cache and access log off), take turns in each round; each round times ``--requests`` misses
with ``time.process_time``. The event loop turns once every ``--batch`` requests (the batched
L2 write and the flights' ends run then, as between the requests of one loop turn at load).

What it leaves out is the same for both: gunicorn's parsing, the sockets, the backend. So the
difference, *added µs per miss*, is what the default configuration costs on top of the proxy
path; the bench's shipped/stripped CPU ratio is (stripped + added) / stripped there.
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import tempfile
import time
from typing import Any

CHAT = "/v1/chat/completions"
ANSWER = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench",'
          b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the bench backend, '
          b'a short answer."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,'
          b'"total_tokens":21}}')
BACKEND = "127.0.0.1:9"


def _no_coalescing(rt: Any) -> None:
    rt.coalescer = None


def _no_l2(rt: Any) -> None:
    rt.cache.shared = None  # L1 only (each answer stored straight into it)


# Diagnostics: the gateway as shipped without one piece (never a configuration users run).
def _core(rt: Any) -> None:
    _no_coalescing(rt)
    _no_l2(rt)


ABLATIONS = {"no access log": lambda rt: None, "no coalescing": _no_coalescing, "no L2 (L1 only)": _no_l2,
             "none of the three": _core}


def _gateway(shipped: bool, directory: str) -> Any:
    from ntonix.config.validate import build_config
    from ntonix.gateway.endpoints import Gateway
    from ntonix.gateway.runtime import Runtime
    from ntonix.telemetry.recorder import Telemetry
    from ntonix.upstream.fake import ScriptedTransport

    raw: dict[str, Any] = {"backends": [{"host": "127.0.0.1", "port": 9}], "server": {"ssl_port": 0},
                           "health": {"enabled": False}, "cache": {"dir": directory}}
    if not shipped:
        raw["cache"]["enabled"] = False
    config = build_config(raw)
    transport = ScriptedTransport()
    return Gateway(Runtime(config, Telemetry(config), transport)), transport


def _environ(body: bytes) -> dict[str, Any]:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": CHAT, "RAW_URI": CHAT, "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
            "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json", "HTTP_HOST": "127.0.0.1:8080"}


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000, help="misses per gateway per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16, help="requests per turn of the event loop")
    ap.add_argument("--stream", action="store_true",
                    help="streamed requests: 20 SSE events each, as the bench's scenario 4 (its ends spread "
                         "out: use --batch 1)")
    ap.add_argument("--only", help="one gateway: shipped, stripped or an ablation (e.g. under a profiler)")
    ap.add_argument("--ablate", action="store_true",
                    help="also shipped without each piece in turn (access log, coalescing, L2), in the same "
                         "rounds: what each piece costs")
    args = ap.parse_args()
    from gevent import monkey

    monkey.patch_all()
    import logging

    import gevent

    from ntonix.config.model import LoggingConfig
    from ntonix.telemetry.logs import ACCESS, make_access_handler
    from ntonix.upstream.fake import Reply
    from tools.bench.backend import sse_events

    work = tempfile.mkdtemp(prefix="ntonix-miss-cost-")
    log_cfg = LoggingConfig(file=f"{work}/access.log")
    ACCESS.configure(log_cfg, make_access_handler(log_cfg))
    logging.getLogger("ntonix").setLevel(logging.WARNING)
    loop = gevent.get_hub().loop
    names: tuple[str, ...] = (args.only,) if args.only else ("shipped", "stripped")
    if args.ablate and not args.only:
        names += tuple(ABLATIONS)
    gateways = {name: _gateway(name != "stripped", f"{work}/{name}") for name in names}
    for name, (gw, _) in gateways.items():
        if name in ABLATIONS:
            ABLATIONS[name](gw.rt)
    for gw, _ in gateways.values():
        gw.rt.start(gevent.spawn, gevent.sleep, defer=loop.run_callback, lock=None)
    gc.collect()  # the worker's collector settings (ntonix/server/worker.py)
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    serial = 0

    def run(name: str, n: int) -> float:
        nonlocal serial
        gw, transport = gateways[name]
        if not args.stream:
            transport.script(BACKEND, *(Reply(200, chunks=[ANSWER], headers=[("Content-Type", "application/json")])
                                        for _ in range(n)))
        ACCESS.enabled = name not in ("stripped", "no access log", "none of the three")
        headers = {"HTTP_HOST": "127.0.0.1:8080", "HTTP_CONTENT_TYPE": "application/json"}
        bodies = []
        for _ in range(n):
            serial += 1
            bodies.append(b'{"model":"bench","messages":[{"role":"user","content":"miss %d"}]%s}'
                          % (serial, b',"stream":true' if args.stream else b""))
        if args.stream:
            sse = [("Content-Type", "text/event-stream")]
            transport.script(BACKEND, *(Reply(200, chunks=sse_events(body), headers=sse) for body in bodies))
        t = time.process_time()
        for i, body in enumerate(bodies):
            if gw.cached_hit("POST", CHAT, headers, body, "127.0.0.1") is not None:
                raise SystemExit("a hit: the prompts are meant to be unique")
            answer = gw(_environ(body), _start_response)
            for _ in answer:
                pass
            answer.close()
            if i % args.batch == args.batch - 1:
                gevent.sleep(0)
        gevent.sleep(0)
        ACCESS.flush()
        if len(transport.exchanges) != n:
            raise SystemExit(f"{name}: {len(transport.exchanges)} of {n} misses reached the backend")
        transport.exchanges.clear()
        return (time.process_time() - t) / n * 1e6

    for name in gateways:
        run(name, min(args.requests, 500))  # warm: code paths, the L2 map
    per: dict[str, list[float]] = {name: [] for name in gateways}
    for _ in range(args.rounds):
        for name in gateways:
            per[name].append(run(name, args.requests))
    if args.only:
        print(f"{args.only:9s} {statistics.median(per[args.only]):7.1f} µs/miss")
        return
    # Other load on the machine only ever adds CPU time (cache misses, frequency): the least
    # of the rounds is the steadiest figure, the median the usual one.
    added = [s - b for s, b in zip(per["shipped"], per["stripped"], strict=True)]
    for name, values in per.items():
        print(f"{name:9s} median {statistics.median(values):6.1f}  least {min(values):6.1f} µs/miss  "
              f"(rounds {min(values):.1f}–{max(values):.1f})")
    for name in ABLATIONS:
        if name in per:
            print(f"  {name:22s} saves  median {statistics.median(per['shipped']) - statistics.median(per[name]):5.1f}"
                  f"  least {min(per['shipped']) - min(per[name]):5.1f} µs/miss")
    least = min(per["shipped"]) - min(per["stripped"])
    print(f"added     median {statistics.median(added):6.1f}  least {least:6.1f} µs/miss; shipped/stripped "
          f"{statistics.median(per['shipped']) / statistics.median(per['stripped']):.2f} × "
          f"(least {min(per['shipped']) / min(per['stripped']):.2f} ×)")


if __name__ == "__main__":
    main()
