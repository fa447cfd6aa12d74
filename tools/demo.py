#!/usr/bin/env python3
"""NTONIX in about a minute: caching, weighted load balancing, failover and streaming, live.

    scripts/demo

Sets up .venv (requirements.txt) through scripts/_venv.sh, starts two mock LLM backends with a
visible delay (0.3 s to the first token, 50 ms per token) and the gateway in front of them
(weights 1:3, plain HTTP, free loopback ports), then narrates real requests and answers:

  1. a cache miss, then the same request as a hit, and the time saved;
  2. 40 requests spread by weight (counted per backend);
  3. the busier backend killed while requests keep flowing: not one error;
  4. the backend started again: traffic returns to it;
  5. a streamed answer, event by event, then replayed from the cache;
  6. the gateway's /metrics and /cache/stats.

Everything it starts is stopped by PID at the end (also on Ctrl-C). Logs: run/demo/.
Environment: DEMO_PAUSE=1 waits for Enter between the parts.
"""

import http.client
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from tools import ROOT
from tools.procs import Child, clean_env, free_port, wait_until

RUN = os.path.join(ROOT, "run", "demo")
T = TypeVar("T")
TTFT, TOKEN_DELAY, TOKENS = 0.3, 0.05, 12
FAST = {"X-Mock-TTFT": "0", "X-Mock-Token-Delay": "0"}  # the mock answers at once (per-request headers)
NO_STORE = {"Cache-Control": "no-store"}
PAUSE = os.environ.get("DEMO_PAUSE") == "1"

BOLD, DIM, GREEN, RED, CYAN, RESET = (("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[36m", "\033[0m")
                                      if sys.stdout.isatty() else ("",) * 6)


def say(text: str = "") -> None:
    print(text, flush=True)


def part(title: str) -> None:
    if PAUSE:
        input(f"{DIM}(Enter to go on){RESET}")
    say(f"\n{BOLD}== {title} =={RESET}")


# ----------------------------------------------------------------------------- processes


def child_env() -> dict[str, str]:
    # The demo writes its own config file; a developer's NTONIX_* must not change it.
    return clean_env()


def start_child(name: str, argv: list[str], env: dict[str, str]) -> Child:
    """A child whose output goes to run/demo/<name>.log."""
    return Child(name, argv, os.path.join(RUN, f"{name}.log"), env)


def start_mock(name: str, port: int) -> Child:
    return start_child(name, [sys.executable, "-m", "mock_llm", "--port", str(port), "--name", name, "--ttft",
                              str(TTFT), "--token-delay", str(TOKEN_DELAY), "--tokens", str(TOKENS)], child_env())


def wait_for(what: str, check: Callable[[], T], proc: Child | None = None, timeout: float = 30.0) -> T:
    try:
        return wait_until(what, check, proc, timeout=timeout, every=0.1)
    except RuntimeError as exc:
        tail = f"\n{proc.tail()}" if proc is not None and not proc.alive() else ""
        raise SystemExit(f"{RED}error: {exc}{RESET}{tail}") from None


# ----------------------------------------------------------------------------- HTTP


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, ms: float) -> None:
        self.status, self.headers, self.body, self.ms = status, headers, body, ms

    def json(self) -> Any:
        return json.loads(self.body)

    def instance(self) -> str:
        return self.headers.get("x-mock-instance", "?")


def request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 30.0) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    started = time.perf_counter()
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload,
                      (time.perf_counter() - started) * 1000)
    finally:
        conn.close()


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": prompt}], **extra}


def show_request(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> None:
    hdrs = "".join(f" -H '{k}: {v}'" for k, v in (headers or {}).items())
    say(f"{CYAN}→ {method} {path}{hdrs}{RESET}" + (f" {json.dumps(body)}" if body is not None else ""))


def show_answer(ans: Answer, text: bool = True) -> None:
    cache = ans.headers.get("x-cache")
    say(f"{CYAN}←{RESET} {ans.status}  X-Cache: {BOLD}{cache}{RESET}  X-Request-ID: {ans.headers.get('x-request-id')}"
        f"  from {ans.instance()}  in {BOLD}{ans.ms:.0f} ms{RESET}")
    if text and ans.status == 200:
        say(f"  {DIM}{ans.json()['choices'][0]['message']['content']}{RESET}")


def bar(counts: Counter[str], names: list[str]) -> None:
    total = sum(counts.values()) or 1
    scale = min(1.0, 40 / max(counts.values(), default=1))
    for name in [*names, *sorted(set(counts) - set(names))]:
        n = counts.get(name, 0)
        say(f"  {name:<10} {n:>3}  {n / total:>4.0%}  {'█' * round(n * scale)}")


# ----------------------------------------------------------------------------- the parts


def part_cache(port: int) -> None:
    part("1. Cache: a miss, then the same request as a hit")
    body = chat("What is NTONIX, in one sentence?")
    show_request("POST", "/v1/chat/completions", body)
    miss = request(port, "POST", "/v1/chat/completions", body)
    show_answer(miss)
    say(f"{DIM}  (the mock took {TTFT} s to the first token plus {TOKEN_DELAY * 1000:.0f} ms for each further"
        f" token){RESET}")
    say("Same request again (key order and spacing of the JSON do not matter):")
    reordered = {"messages": body["messages"], "model": "mock"}
    show_request("POST", "/v1/chat/completions", reordered)
    hit = request(port, "POST", "/v1/chat/completions", reordered)
    show_answer(hit)
    same = "byte-identical" if hit.body == miss.body else f"{RED}DIFFERENT{RESET}"
    say(f"{GREEN}✓ served from the cache in {hit.ms:.1f} ms instead of {miss.ms:.0f} ms: {miss.ms - hit.ms:.0f} ms"
        f" saved ({miss.ms / max(hit.ms, 0.1):.0f}× faster), {same} answer{RESET}")


def spread(port: int, n: int, label: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for i in range(n):
        ans = request(port, "POST", "/v1/chat/completions", chat(f"{label} #{i}"), {**FAST, **NO_STORE})
        counts[ans.instance() if ans.status == 200 else f"HTTP {ans.status}"] += 1
    return counts


def part_balance(port: int, names: list[str]) -> None:
    part("2. Load balancing: weights 1:3")
    say(f"40 different requests, Cache-Control: no-store so each one goes to a backend "
        f"{DIM}(and X-Mock-TTFT: 0, so the mock answers at once){RESET}:")
    show_request("POST", "/v1/chat/completions", chat("balance #0"), {**FAST, **NO_STORE})
    counts = spread(port, 40, "balance")
    bar(counts, names)
    say(f"{GREEN}✓ smooth weighted round-robin: about 25 % / 75 % (each of the gateway's 2 worker processes "
        f"balances on its own){RESET}")


def traffic(port: int, stop: threading.Event, results: list[tuple[float, str, int]], t0: float) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        try:
            # 50 ms to the first token: some requests are on their way when the backend dies.
            ans = request(port, "POST", "/v1/chat/completions", chat(f"failover {threading.get_ident()} {i}"),
                          {"X-Mock-TTFT": "0.05", "X-Mock-Token-Delay": "0", **NO_STORE}, timeout=10)
            who = ans.instance() if ans.status == 200 else f"error: {ans.body[:200].decode(errors='replace')}"
            results.append((time.monotonic() - t0, who, ans.status))
        except (OSError, http.client.HTTPException) as exc:  # a cut connection, a truncated body
            results.append((time.monotonic() - t0, f"error: {exc!r}", 0))


def gateway_health(port: int) -> dict[str, Any]:
    health: dict[str, Any] = request(port, "GET", "/health").json()
    return health


def part_failover(port: int, victim: Child, victim_address: str, names: list[str]) -> int:
    part(f"3. Failover: {victim.name} is killed while requests keep coming")
    say(f"Four clients send requests without pause; after 1.5 s: {BOLD}kill -9{RESET} {victim.name}"
        f" (process group {victim.pid}).")
    stop = threading.Event()
    results: list[tuple[float, str, int]] = []
    t0 = time.monotonic()
    clients = [threading.Thread(target=traffic, args=(port, stop, results, t0), daemon=True) for _ in range(4)]
    for c in clients:
        c.start()
    time.sleep(1.5)
    killed_at = time.monotonic() - t0
    victim.kill_hard()
    say(f"  {RED}✗ {victim.name} killed at t={killed_at:.1f} s{RESET}")
    time.sleep(2.5)
    stop.set()
    for c in clients:
        c.join(timeout=15)
    before = Counter(who for t, who, _ in results if t < killed_at)
    after = Counter(who for t, who, _ in results if t >= killed_at)
    errors = [r for r in results if r[2] != 200]
    say(f"{len(results)} requests in {results[-1][0]:.1f} s:")
    say("  before the kill:")
    bar(before, names)
    say("  after the kill:")
    bar(after, names)
    colour = GREEN if not errors else RED
    say(f"{colour}{'✓' if not errors else '✗'} errors seen by the clients: {len(errors)}{RESET}"
        + (f" {errors[:5]}" if errors else ""))
    failed = sum(b.get("errors", 0) for b in request(port, "GET", "/metrics").json().get("backends", [])
                 if b.get("address") == victim_address)
    say(f"  {failed} attempts failed on {victim.name} (on their way when it died, or refused before the health checks"
        f" took it out); the gateway retried them on the other backend"
        + (", so no client saw it." if not errors else f"; {len(errors)} had already started answering."))
    health = wait_for("the health checks to notice", lambda: (h := gateway_health(port))["backends"]["healthy"] == 1
                      and h, timeout=15)
    say(f"Active health checks took it out of rotation: GET /health → {json.dumps(health)}")
    return len(errors)


def part_recovery(port: int, name: str, mock_port: int, names: list[str]) -> Child:
    part(f"4. {name} is back")
    proc = start_mock(name, mock_port)
    say(f"Started {name} again on port {mock_port} (pid {proc.pid}).")
    t0 = time.monotonic()
    # Every worker process probes on its own: ask /health a few times, so both workers answered.
    wait_for(f"{name} to be healthy", lambda: all(gateway_health(port)["backends"]["healthy"] == 2 for _ in range(8)),
             proc, timeout=30)
    say(f"{GREEN}✓ health checks saw it come back after {time.monotonic() - t0:.1f} s: "
        f"{json.dumps(gateway_health(port))}{RESET}")
    counts = spread(port, 20, "recovered")
    say("20 more requests:")
    bar(counts, names)
    return proc


def part_stream(port: int) -> None:
    part("5. Streaming: each event as the backend sends it")
    body = chat("Tell me a short story", stream=True)
    show_request("POST", "/v1/chat/completions", body)
    for attempt in ("first", "again"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        say(f"{CYAN}←{RESET} {resp.status}  Content-Type: {resp.getheader('Content-Type')}  X-Cache: "
            f"{BOLD}{resp.getheader('X-Cache')}{RESET}")
        buf, events, first_ms, line = b"", 0, None, ""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                ms = (time.perf_counter() - started) * 1000
                first_ms = ms if first_ms is None else first_ms
                events += 1
                data = event.decode().removeprefix("data: ")
                shown = "data: [DONE]"
                if data != "[DONE]":
                    parsed = json.loads(data)
                    delta = parsed["choices"][0]["delta"]
                    line += delta.get("content") or ""
                    shown = f'data: {{"id": "{parsed.get("id")}", … "delta": {json.dumps(delta)}, …}}'
                if attempt == "first":
                    say(f"  {DIM}{ms:6.0f} ms{RESET}  {shown}")
        conn.close()
        total = (time.perf_counter() - started) * 1000
        say(f"  text: {line.strip()}")
        if attempt == "first":
            say(f"{GREEN}✓ {events} events, the first after {first_ms:.0f} ms, then one every ~{TOKEN_DELAY * 1000:.0f}"
                f" ms: relayed as they came, not held back ({total:.0f} ms in all){RESET}")
            say("The same streamed request again: a finished stream is cached and replayed:")
        else:
            say(f"{GREEN}✓ the same {events} events from the cache in {total:.1f} ms{RESET}")


def part_figures(port: int) -> None:
    part("6. The gateway's own figures (all workers together)")
    show_request("GET", "/metrics")
    metrics = request(port, "GET", "/metrics").json()
    keys = ("requests_total", "requests_active", "cache_hits", "cache_misses", "connections_active", "uptime_s",
            "memory_rss_bytes")
    say(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    for b in metrics.get("backends", []):
        say(f"  backend {b.get('address')}: state={b.get('state')} requests={b.get('requests')} "
            f"errors={b.get('errors')} latency_avg_ms={b.get('latency_avg_ms')}")
    say(f"{DIM}  (a backend's errors count the failed attempts the gateway retried elsewhere; Prometheus text: "
        f"GET /metrics?format=prometheus){RESET}")
    show_request("GET", "/cache/stats")
    say(json.dumps(request(port, "GET", "/cache/stats").json(), indent=2))


# ----------------------------------------------------------------------------- main


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(RUN, ignore_errors=True)
    os.makedirs(RUN)
    procs: list[Child] = []

    def on_signal(signum: int, frame: object) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        gw_port = free_port()
        mocks = {"backend-a": (free_port(), 1), "backend-b": (free_port(), 3)}
        names = list(mocks)
        config = {
            "server": {"host": "127.0.0.1", "port": gw_port, "ssl_port": 0, "threads": 2, "graceful_timeout_s": 10},
            "backends": [{"host": "127.0.0.1", "port": p, "weight": w} for p, w in mocks.values()],
            "health": {"interval_s": 0.5, "timeout_s": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 2},
            "cache": {"dir": os.path.join(RUN, "cache")},
            "logging": {"level": "warning"},
        }
        cfg_path = os.path.join(RUN, "ntonix.json")
        with open(cfg_path, "w") as fh:
            json.dump(config, fh, indent=2)

        say(f"{BOLD}NTONIX demo{RESET}: two mock LLM backends behind the gateway.")
        for name, (port, weight) in mocks.items():
            procs.append(start_mock(name, port))
            say(f"  mock {name}: 127.0.0.1:{port}, weight {weight}  (pid {procs[-1].pid};"
                f" {TTFT} s to the first token, {TOKEN_DELAY * 1000:.0f} ms per token, {TOKENS} tokens)")
        for proc, (port, _) in zip(procs, mocks.values(), strict=True):
            def up(p: int = port) -> bool:
                return request(p, "GET", "/health", timeout=1).status == 200

            wait_for(proc.name, up, proc)
        gateway = start_child("gateway", [sys.executable, "-m", "ntonix", "--config", cfg_path], child_env())
        procs.append(gateway)
        say(f"  gateway: http://127.0.0.1:{gw_port}  (pid {gateway.pid}; python -m ntonix --config {cfg_path})")
        wait_for("the gateway", lambda: request(gw_port, "GET", "/health", timeout=1).status == 200, gateway)
        say(f"  {DIM}config: {json.dumps(config)}{RESET}")
        say(f"  {DIM}logs: {RUN}/*.log{RESET}")

        part_cache(gw_port)
        part_balance(gw_port, names)
        victim = procs[1]
        client_errors = part_failover(gw_port, victim, f"127.0.0.1:{mocks[victim.name][0]}", names)
        procs[1] = part_recovery(gw_port, victim.name, mocks[victim.name][0], names)
        part_stream(gw_port)
        part_figures(gw_port)

        part("Done")
        status = gateway.stop()
        procs.remove(gateway)
        say(f"kill -TERM {gateway.pid}: the gateway drained and exited with status {status}.")
        say(f"Demo finished in {time.monotonic() - started:.0f} s. Next: scripts/start (README.md), "
            f"docs/architecture.md, docs/configuration.md.")
        if client_errors:
            say(f"{RED}✗ but {client_errors} request(s) failed during the failover: see run/demo/gateway.log{RESET}")
            return 1
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
