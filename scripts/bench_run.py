#!/usr/bin/env python3
"""The benchmark behind ``scripts/bench``: NTONIX against nginx and the gunicorn/gevent floor.

Run it through ``scripts/bench`` (which installs wrk and nginx and sets up .venv); see
docs/performance.md for the method and a full run's table.

Layout on a 2-core machine: every proxy under test (the gateway with 1 worker, nginx with
1 worker process, the floor app with 1 worker) runs pinned to ``--proxy-cpu`` (0); the load
(wrk with one thread, the SSE and slow-read clients) and the two bench backends run pinned to
``--load-cpu`` (1). Within each scenario the targets are interleaved (A B C A B C ...) for
``--rounds`` rounds; the table shows the median of the rounds and their spread (min–max).
CPU per request is the user+system time of the target's whole process tree (master and
workers, from /proc/<pid>/stat) over the run, divided by the requests wrk completed.
"other" is the CPU that processes outside the bench used meanwhile (from /proc/stat), as % of
one core: when it is high, another workload shared the machine and the figures are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CHAT = "/v1/chat/completions"


# ============================================================================ /proc helpers

def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read().decode()
    return raw[raw.rindex(")") + 2:].split()  # fields from "state" (3rd) on


def children_of() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids = children_of()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
            total += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total / CLK


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
    return total


def busy_jiffies() -> dict[int, int]:
    """Busy time per CPU (user, nice, system, irq, softirq, steal) from /proc/stat."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            name, *rest = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                f = [int(x) for x in rest]
                out[int(name[3:])] = f[0] + f[1] + f[2] + f[5] + f[6] + f[7]
    return out


def own_cpu_seconds() -> float:
    ru, rc = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime + rc.ru_utime + rc.ru_stime


class Meter:
    """CPU of the target tree over one run, and what processes outside the bench took meanwhile.

    Everything the bench runs is pinned: proxies to the proxy CPU, backends, load generators
    and this script to the load CPU. So per CPU, busy time minus the bench's own processes
    there is foreign work: ``other_proxy_pct`` and ``other_load_pct``, in % of that CPU.
    """

    def __init__(self, target: Proc | None, procs: list[Proc], proxy_cpu: int, load_cpu: int) -> None:
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
        self.samples: list[int] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._stop_evt.is_set():
            if n % 20 == 0:
                self.pids = tree(self.pid)
            n += 1
            rss = rss_bytes(self.pids)
            self.samples.append(rss)
            self.peak = max(self.peak, rss)
            self._stop_evt.wait(self.every)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        return self.peak


# ============================================================================ processes

@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    cpu: int
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with status {proc.popen.returncode} (see its log)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout:g} s")


def http_request(port: int, method: str, path: str, body: bytes | None = None, tls: bool = False,
                 headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                                                        context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# ============================================================================ wrk

WRK_LUA = r"""
-- args: mode ("unique" | "same"), nonce, path
local mode, nonce, path = "unique", "0", "/v1/chat/completions"
local counter = 0
local headers = {["Content-Type"] = "application/json"}
local same_body
function init(args)
  mode = args[1] or mode
  nonce = args[2] or nonce
  path = args[3] or path
  same_body = '{"model":"bench-model","messages":[{"role":"user","content":"the same prompt ' .. nonce
    .. ', every time"}],"temperature":0}'
end
function request()
  if mode == "same" then
    return wrk.format("POST", path, headers, same_body)
  end
  counter = counter + 1
  return wrk.format("POST", path, headers, '{"model":"bench-model","messages":[{"role":"user","content":'
    .. '"unique prompt ' .. nonce .. '-' .. counter .. ': say hello"}],"temperature":0}')
end
%STAGGER%
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""

# The first request of each connection waits a random 0..BENCH_STAGGER_MS ms: with a 1 s backend, wrk's
# connections would otherwise send in lockstep waves (all at once, every second) instead of
# at a steady rate. wrk starts its latency clock when the request is written, after the delay.
WRK_STAGGER = r"""
local stagger_ms = tonumber(os.getenv("BENCH_STAGGER_MS") or "0")
local first = tonumber(os.getenv("BENCH_CONNS") or "0")
math.randomseed(os.time())
function delay()
  if first > 0 then
    first = first - 1
    return math.random(0, stagger_ms)
  end
  return 0
end
"""


# ============================================================================ the bench

BRIEF = ("rps", "p50_ms", "p99_ms", "errors", "cpu_us", "ttft_p50_ms", "ttft_p99_ms", "streams", "ok", "errors_detail",
         "rss_mb", "growth_mb", "first_error", "other_proxy_pct", "other_load_pct")


@dataclass
class Result:
    scenario: str
    param: str
    target: str
    round: int
    m: dict[str, Any]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.dir = Path(tempfile.mkdtemp(prefix="ntonix-bench-"))
        os.chmod(self.dir, 0o755)  # nginx workers (nobody) create their temp files in here
        self.procs: list[Proc] = []
        self.results: list[Result] = []
        self.nonce = f"{os.getpid()}-{int(time.time())}"
        self.runs = 0
        for name, body in (("post.lua", WRK_LUA.replace("%STAGGER%", "")),
                           ("post_stagger.lua", WRK_LUA.replace("%STAGGER%", WRK_STAGGER))):
            (self.dir / name).write_text(body)
        self.fast: list[Proc] = []

    # ------------------------------------------------------------------ process management
    def _spawn(self, name: str, argv: list[str], cpu: int, env: dict[str, str] | None = None) -> Proc:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        popen = subprocess.Popen(["taskset", "-c", str(cpu), *argv], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
                                 env={**os.environ, **(env or {})})
        log.close()
        proc = Proc(name, popen, cpu)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if proc not in self.procs:
            return
        self.procs.remove(proc)
        if proc.popen.poll() is not None:
            return
        family = tree(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"   ({proc.name} did not stop in {timeout:g} s: SIGKILL)", flush=True)
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.popen.wait(5)
        # Workers normally exit with their master; any straggler is killed by its own PID.
        for pid in family[1:]:
            with contextlib.suppress(ProcessLookupError, OSError):
                if Path(f"/proc/{pid}").exists() and int(_stat_fields(pid)[1]) in (1, proc.pid):
                    os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=10)

    # ------------------------------------------------------------------ starters
    def start_backend(self, name: str, delay: float = 0.0) -> Proc:
        port = free_port()
        argv = [PY, str(SCRIPTS / "bench_backend.py"), "--port", str(port)]
        if delay:
            argv += ["--delay", str(delay)]
        proc = self._spawn(name, argv, self.a.load_cpu)
        proc.port = port
        wait_port(port, proc)
        return proc

    def start_gateway(self, name: str, backends: list[Proc], cache: bool = False, tls: bool = False) -> Proc:
        port = free_port()
        ssl_port = free_port() if tls else 0
        cfg: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": port, "ssl_port": ssl_port, "threads": 1,
                       "worker_connections": self.a.worker_connections},
            "backends": [{"host": "127.0.0.1", "port": b.port} for b in backends],
            "pool": {"size": 64, "max_size": self.a.pool_max},
            "cache": {"enabled": cache, "dir": str(self.dir / f"{name}-cache")},
            "logging": {"level": "warning", "access_log": False},
        }
        if tls:
            cfg["ssl"] = {"cert_file": str(self.cert_dir / "server.crt"), "key_file": str(self.cert_dir / "server.key")}
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=1))
        proc = self._spawn(name, [PY, "-m", "ntonix", "--config", str(path)], self.a.proxy_cpu)
        proc.port = port
        proc.extra["ssl_port"] = ssl_port
        wait_port(port, proc)
        if ssl_port:
            wait_port(ssl_port, proc)
        self._wait_ok(proc, port)
        return proc

    def start_floor(self) -> Proc:
        port = free_port()
        proc = self._spawn("floor", [PY, str(SCRIPTS / "bench_minimal_app.py"), "--port", str(port),
                                     "--workers", "1", "--worker-connections", str(self.a.worker_connections)],
                           self.a.proxy_cpu)
        proc.port = port
        wait_port(port, proc)
        self._wait_ok(proc, port)
        return proc

    def start_nginx(self, name: str, backends: list[Proc], cache: bool = False, tls: bool = False) -> Proc:
        port = free_port()
        ssl_port = free_port() if tls else 0
        prefix = self.dir / name
        prefix.mkdir(exist_ok=True)
        os.chmod(prefix, 0o755)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, port, [b.port for b in backends], cache=cache, ssl_port=ssl_port,
                                   cert_dir=self.cert_dir if tls else None,
                                   worker_connections=self.a.worker_connections * 2 + 64))
        proc = self._spawn(name, ["nginx", "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(conf)],
                           self.a.proxy_cpu)
        proc.port = port
        proc.extra["ssl_port"] = ssl_port
        wait_port(port, proc)
        self._wait_ok(proc, port)
        return proc

    def _wait_ok(self, proc: Proc, port: int, timeout: float = 20.0) -> None:
        """Until a chat completion through ``proc`` answers 200 (its backends count as healthy)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                status, _, body = http_request(port, "POST", CHAT, b'{"model":"bench-model","messages":[]}')
                if status == 200:
                    return
                last = f"status {status}: {body[:200]!r}"
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise RuntimeError(f"{proc.name}: no 200 within {timeout:g} s (last: {last})")

    @property
    def cert_dir(self) -> Path:
        d = self.dir / "cert"
        if not (d / "server.crt").exists():
            subprocess.run([PY, str(SCRIPTS / "gen_dev_cert.py"), "--out-dir", str(d)], check=True,
                           stdout=subprocess.DEVNULL)
        return d

    # ------------------------------------------------------------------ load runners
    def wrk(self, url: str, conns: int, seconds: float, target: Proc | None, mode: str = "unique",
            stagger_ms: int = 0) -> dict[str, Any]:
        self.runs += 1
        script = self.dir / ("post_stagger.lua" if stagger_ms else "post.lua")
        path = "/" + url.split("/", 3)[3]
        base = url[:len(url) - len(path) + 1]
        argv = ["taskset", "-c", str(self.a.load_cpu), "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s",
                "--timeout", "10s", "-s", str(script), base, "--", mode, f"{self.nonce}-{self.runs}", path]
        env = {**os.environ, "BENCH_STAGGER_MS": str(stagger_ms), "BENCH_CONNS": str(conns)}
        with Meter(target, list(self.procs), self.a.proxy_cpu, self.a.load_cpu) as meter:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90, env=env)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
        w = json.loads(line[len("BENCH_JSON "):])
        n = w["requests"]
        errors = w["connect"] + w["read"] + w["write"] + w["timeout"] + w["status"]
        return {"rps": n / (w["duration_us"] / 1e6), "requests": n, "p50_ms": w["p50_us"] / 1000,
                "p99_ms": w["p99_us"] / 1000, "max_ms": w["max_us"] / 1000, "errors": errors,
                "errors_detail": {k: w[k] for k in ("connect", "read", "write", "timeout", "status") if w[k]},
                "cpu_us": meter.target_cpu * 1e6 / n if n and target else float("nan"),
                "cpu_util_pct": meter.target_cpu / meter.wall * 100 if target else float("nan"),
                **meter.figures}

    def sse(self, ports: list[int], streams: int, target: Proc | None) -> dict[str, Any]:
        argv = ["taskset", "-c", str(self.a.load_cpu), PY, str(SCRIPTS / "bench_sse_client.py"),
                "--streams", str(streams), "--seconds", str(self.a.sse_seconds), "--ramp", "1",
                "--nonce", f"{self.nonce}-{self.runs}"]
        self.runs += 1
        for p in ports:
            argv += ["--port", str(p)]
        sampler = RssSampler(target.pid, 0.1) if target else None
        base_rss = rss_bytes(tree(target.pid)) if target else 0
        if sampler:
            sampler.start()
        with Meter(target, list(self.procs), self.a.proxy_cpu, self.a.load_cpu) as meter:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=self.a.sse_seconds + 120)
        peak = sampler.stop() if sampler else 0
        try:
            r = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"SSE client failed: {out.stdout[-500:]} {out.stderr[-1500:]}") from None
        r["intact"] = r["ok"] == r["streams"] and r["streams"] > 0
        r["rss_mb"] = peak / 2**20 if target else float("nan")
        r["rss_base_mb"] = base_rss / 2**20 if target else float("nan")
        r["cpu_us_per_stream"] = meter.target_cpu * 1e6 / max(1, r["streams"]) if target else float("nan")
        r.update(meter.figures)
        return r

    def slow_read(self, target: Proc) -> dict[str, Any]:
        # Warm up (pools, buffers, code paths), then measure growth over the settled baseline.
        subprocess.run([PY, str(SCRIPTS / "bench_slow_reader.py"), "--port", str(target.port), "--mb", "4",
                        "--every", "0"], capture_output=True, timeout=60)
        time.sleep(0.3)
        base = rss_bytes(tree(target.pid))
        sampler = RssSampler(target.pid, 0.02)
        sampler.start()
        argv = ["taskset", "-c", str(self.a.load_cpu), PY, str(SCRIPTS / "bench_slow_reader.py"),
                "--port", str(target.port), "--mb", str(self.a.big_mb), "--every", str(self.a.big_every)]
        with Meter(target, list(self.procs), self.a.proxy_cpu, self.a.load_cpu) as meter:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        peak = sampler.stop()
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update({"rss_base_mb": base / 2**20, "rss_peak_mb": peak / 2**20, "growth_mb": (peak - base) / 2**20,
                  "cpu_s": meter.target_cpu, **meter.figures})
        return r

    def record(self, scenario: str, param: str, target: str, rnd: int, m: dict[str, Any]) -> None:
        self.results.append(Result(scenario, param, target, rnd, m))
        brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in m.items()
                 if k in BRIEF and v not in ("", {})}
        print(f"   [{scenario} {param} r{rnd + 1}] {target:<14} {brief}", flush=True)

    # ------------------------------------------------------------------ scenarios
    def s1_miss(self) -> None:
        print("\n== 1. cache miss, small JSON (unique prompt per request)", flush=True)
        gw = self.start_gateway("gw-miss", self.fast)
        ngx = self.start_nginx("nginx-proxy", self.fast)
        floor = self.start_floor()
        direct = self.fast[0]
        try:
            for c in self.a.conns:
                targets: list[tuple[str, Proc]] = [("gateway", gw), ("nginx", ngx), ("floor", floor)]
                if c == 500:
                    targets.append(("direct", direct))
                for _, proc in targets:  # warm-up, not recorded
                    self.wrk(f"http://127.0.0.1:{proc.port}{CHAT}", c, self.a.warmup, None)
                for rnd in range(self.a.rounds):
                    for name, proc in targets:
                        m = self.wrk(f"http://127.0.0.1:{proc.port}{CHAT}", c, self.a.seconds,
                                     None if name == "direct" else proc)
                        self.record("1", f"c={c}", name, rnd, m)
        finally:
            for p in (floor, ngx, gw):
                self.stop(p)

    def s2_hit(self) -> None:
        print("\n== 2. cache hit, c=500 (the same body every request)", flush=True)
        gw = self.start_gateway("gw-hit", self.fast, cache=True)
        ngx = self.start_nginx("nginx-cache", self.fast, cache=True)
        floor = self.start_floor()
        c = 500
        try:
            targets = [("gateway", gw), ("nginx", ngx), ("floor", floor)]
            for _, proc in targets:
                self.wrk(f"http://127.0.0.1:{proc.port}{CHAT}", c, self.a.warmup, None, mode="same")
            for rnd in range(self.a.rounds):
                for name, proc in targets:
                    m = self.wrk(f"http://127.0.0.1:{proc.port}{CHAT}", c, self.a.seconds, proc, mode="same")
                    if name != "floor":
                        m["hit_checked"] = self._check_hit(proc)
                    self.record("2", f"c={c}", name, rnd, m)
        finally:
            for p in (floor, ngx, gw):
                self.stop(p)

    def _check_hit(self, proc: Proc) -> str:
        """The X-Cache / X-Cache-Status of one more request with the same body (must be HIT)."""
        body = (b'{"model":"bench-model","messages":[{"role":"user","content":"the same prompt %s, every time"}],'
                b'"temperature":0}' % f"{self.nonce}-{self.runs}".encode())
        _, h, _ = http_request(proc.port, "POST", CHAT, body)
        return h.get("x-cache", h.get("x-cache-status", "?"))

    def s3_slow(self) -> None:
        print("\n== 3. backend answering after 1 s: added latency over direct", flush=True)
        slow = [self.start_backend("slow-1", delay=1.0), self.start_backend("slow-2", delay=1.0)]
        gw = self.start_gateway("gw-slow", slow)
        ngx = self.start_nginx("nginx-slow", slow)
        try:
            targets = [("direct", slow[0]), ("gateway", gw), ("nginx", ngx)]
            for c in self.a.slow_conns:
                for rnd in range(self.a.rounds):
                    for name, proc in targets:
                        m = self.wrk(f"http://127.0.0.1:{proc.port}{CHAT}", c, self.a.slow_seconds,
                                     None if name == "direct" else proc, stagger_ms=1000)
                        self.record("3", f"c={c}", name, rnd, m)
        finally:
            for p in (ngx, gw, *slow):
                self.stop(p)

    def s4_sse(self) -> None:
        print("\n== 4. SSE streams (20 events 50 ms apart)", flush=True)
        gw = self.start_gateway("gw-sse", self.fast)
        ngx = self.start_nginx("nginx-sse", self.fast)
        try:
            targets: list[tuple[str, list[int], Proc | None]] = [
                ("direct", [b.port for b in self.fast], None), ("gateway", [gw.port], gw), ("nginx", [ngx.port], ngx)]
            for streams in self.a.sse_streams:
                for rnd in range(self.a.rounds):
                    for name, ports, proc in targets:
                        self.record("4", f"C={streams}", name, rnd, self.sse(ports, streams, proc))
        finally:
            for p in (ngx, gw):
                self.stop(p)

    def s5_big(self) -> None:
        print(f"\n== 5. one {self.a.big_mb:g} MB streamed answer, read slowly: peak RSS growth", flush=True)
        gw = self.start_gateway("gw-big", self.fast)
        ngx = self.start_nginx("nginx-big", self.fast)
        try:
            for rnd in range(min(self.a.rounds, 2)):
                for name, proc in (("gateway", gw), ("nginx", ngx)):
                    self.record("5", f"{self.a.big_mb:g} MB", name, rnd, self.slow_read(proc))
        finally:
            for p in (ngx, gw):
                self.stop(p)

    def profile(self) -> str:
        """py-spy on the gateway's (or the floor's) worker under scenario 1 load (cache miss, c=500)."""
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():
            raise RuntimeError("py-spy not found (pip install -r requirements-dev.txt)")
        secs = self.a.profile
        gw = self.start_floor() if self.a.profile_target == "floor" else self.start_gateway("gw-profile", self.fast)
        try:
            workers = [p for p in tree(gw.pid) if p != gw.pid]
            self.wrk(f"http://127.0.0.1:{gw.port}{CHAT}", 500, self.a.warmup, None)
            raw = self.dir / "profile.txt"
            load = subprocess.Popen(["taskset", "-c", str(self.a.load_cpu), "wrk", "-t1", "-c500",
                                     f"-d{secs + 3}s", "-s", str(self.dir / "post.lua"),
                                     f"http://127.0.0.1:{gw.port}/", "--", "unique", self.nonce, CHAT],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1)
                argv = ["taskset", "-c", str(self.a.load_cpu), spy, "record", "-p", str(workers[0]), "-d", str(secs),
                        "-r", "200", "-f", "raw", "-o", str(raw)]
                if self.a.profile_native:
                    argv.append("--native")
                subprocess.run(argv, check=True, capture_output=True, timeout=secs + 60)
            finally:
                load.wait(secs + 30)
            if self.a.profile_out:
                shutil.copy(raw, self.a.profile_out)
            return summarize_profile(raw.read_text())
        finally:
            self.stop(gw)

    def s6_tls(self) -> None:
        c = self.a.tls_conns
        print(f"\n== 6. HTTPS (keep-alive) vs plain HTTP, cache miss, c={c}", flush=True)
        gw = self.start_gateway("gw-tls", self.fast, tls=True)
        ngx = self.start_nginx("nginx-tls", self.fast, tls=True)
        try:
            targets = [("gateway http", f"http://127.0.0.1:{gw.port}{CHAT}", gw),
                       ("gateway https", f"https://127.0.0.1:{gw.extra['ssl_port']}{CHAT}", gw),
                       ("nginx http", f"http://127.0.0.1:{ngx.port}{CHAT}", ngx),
                       ("nginx https", f"https://127.0.0.1:{ngx.extra['ssl_port']}{CHAT}", ngx)]
            for _, url, _ in targets:
                self.wrk(url, c, self.a.warmup, None)
            for rnd in range(self.a.rounds):
                for name, url, proc in targets:
                    self.record("6", f"c={c}", name, rnd, self.wrk(url, c, self.a.seconds, proc))
        finally:
            for p in (ngx, gw):
                self.stop(p)


def _package(frame: str) -> str:
    """The package a py-spy frame ``func (path/file.py:line)`` belongs to."""
    path = frame[frame.rfind("(") + 1:].rstrip(")")
    top = path.split("/")[0].split(".")[0]
    if top in ("ntonix", "gunicorn", "gevent", "geventhttpclient", "orjson", "lmdb", "xxhash", "prometheus_client",
               "pythonjsonlogger", "greenlet"):
        return top
    return "native/other" if "/" not in path and ".py" not in path else "stdlib"


def summarize_profile(raw: str, top: int = 25) -> str:
    """Self and inclusive sample shares per function (lines merged), and self time per package."""
    self_s: dict[str, int] = {}
    incl: dict[str, int] = {}
    pkg: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if "(gevent/threadpool.py" in stack:
            continue  # gevent's resolver thread, idle in a timed wait that py-spy counts as busy
        n = int(count)
        total += n
        frames = [re_line(f) for f in stack.split(";")]
        self_s[frames[-1]] = self_s.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        p = _package(frames[-1])
        pkg[p] = pkg.get(p, 0) + n
    if not total:
        return "no samples"
    out = [f"{total} samples of the worker's main thread (py-spy, 200 Hz, idle excluded)", "",
           "self time by package:"]
    out += [f"  {v / total * 100:5.1f}%  {k}" for k, v in sorted(pkg.items(), key=lambda kv: -kv[1])]
    out += ["", f"top {top} functions by self time:"]
    out += [f"  {v / total * 100:5.1f}%  {k}" for k, v in sorted(self_s.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", f"top {top} functions by inclusive time:"]
    out += [f"  {v / total * 100:5.1f}%  {k}" for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out)


def re_line(frame: str) -> str:
    """``f (path.py:123)`` -> ``f (path.py)``: merge a function's lines."""
    i = frame.rfind(":")
    return frame[:i] + ")" if i > frame.rfind("(") >= 0 else frame


def nginx_conf(prefix: Path, port: int, backends: list[int], *, cache: bool, ssl_port: int,
               cert_dir: Path | None, worker_connections: int) -> str:
    """nginx as the equivalent reverse proxy: keep-alive upstream pool, HTTP/1.1, no buffering."""
    upstream = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    tls = ""
    if ssl_port and cert_dir:
        tls = (f"        listen 127.0.0.1:{ssl_port} ssl backlog=4096;\n"
               f"        ssl_certificate {cert_dir / 'server.crt'};\n"
               f"        ssl_certificate_key {cert_dir / 'server.key'};\n"
               "        ssl_protocols TLSv1.2 TLSv1.3;\n"
               "        ssl_session_cache shared:SSL:1m;\n")
    if cache:
        location = """
            proxy_cache bench;
            proxy_cache_methods POST;
            proxy_cache_key "$request_uri|$request_body";
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_buffering on;  # nginx stores only buffered responses
            add_header X-Cache-Status $upstream_cache_status;"""
    else:
        location = """
            proxy_buffering off;"""
    return f"""# generated by scripts/bench_run.py
worker_processes 1;
daemon off;
master_process on;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
    client_body_temp_path {prefix / 'client_body'};
    proxy_temp_path {prefix / 'proxy_temp'};
    fastcgi_temp_path {prefix / 'fastcgi_temp'};
    uwsgi_temp_path {prefix / 'uwsgi_temp'};
    scgi_temp_path {prefix / 'scgi_temp'};
    {"proxy_cache_path " + str(prefix / "cache") + " levels=1:2 keys_zone=bench:10m max_size=256m "
     "inactive=60m use_temp_path=off;" if cache else ""}
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_buffer_size 64k;
    client_body_in_single_buffer on;
    client_max_body_size 10m;
    upstream backends {{
{upstream}
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{tls}        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-ID $request_id;
            add_header X-Request-ID $request_id;
            proxy_read_timeout 60s;{location}
        }}
    }}
}}
"""


# ============================================================================ the table

def med(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def fmt(v: float, digits: int = 0) -> str:
    if v != v:
        return "-"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def span(values: list[float], digits: int = 0) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt(vals[0], digits)
    return f"{fmt(med(vals), digits)} ({fmt(min(vals), digits)}–{fmt(max(vals), digits)})"


class Table:
    def __init__(self, results: list[Result]) -> None:
        self.r = results
        self.lines: list[str] = []
        self.checks: list[tuple[str, str, bool | None]] = []

    def get(self, scenario: str, param: str, target: str, key: str) -> list[float]:
        return [x.m[key] for x in sorted(self.r, key=lambda x: x.round)
                if x.scenario == scenario and x.param == param and x.target == target and key in x.m]

    def paired(self, scenario: str, param: str, a: str, b: str, key_a: str, key_b: str | None = None,
               op: Callable[[float, float], float] = lambda x, y: x / y if y else float("nan")) -> list[float]:
        """Per round: op(a's key_a, b's key_b)."""
        xa = {x.round: x.m.get(key_a) for x in self.r if (x.scenario, x.param, x.target) == (scenario, param, a)}
        xb = {x.round: x.m.get(key_b or key_a) for x in self.r
              if (x.scenario, x.param, x.target) == (scenario, param, b)}
        return [op(xa[k], xb[k]) for k in sorted(xa) if k in xb and xa[k] is not None and xb[k] is not None]

    def params(self, scenario: str) -> list[str]:
        seen: list[str] = []
        for x in self.r:
            if x.scenario == scenario and x.param not in seen:
                seen.append(x.param)
        return seen

    def targets(self, scenario: str, param: str) -> list[str]:
        seen: list[str] = []
        for x in self.r:
            if (x.scenario, x.param) == (scenario, param) and x.target not in seen:
                seen.append(x.target)
        return seen

    def other(self, sc: str, param: str, t: str) -> str:
        """Foreign CPU use on the proxy's / the load's core (median %), e.g. "3/12"."""
        return (f"{fmt(med(self.get(sc, param, t, 'other_proxy_pct')))}/"
                f"{fmt(med(self.get(sc, param, t, 'other_load_pct')))}")

    def check(self, name: str, shown: str, ok: bool | None) -> None:
        self.checks.append((name, shown, ok))

    def out(self, s: str = "") -> None:
        self.lines.append(s)

    def render(self) -> str:
        self.wrk_section("1", "1. cache miss, small JSON", ratios=True)
        self.wrk_section("2", "2. cache hit", ratios=True)
        self.slow_section()
        self.sse_section()
        self.big_section()
        self.tls_section()
        self.out("")
        self.out("Targets (issue #8)")
        for name, shown, ok in self.checks:
            mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
            self.out(f"  [{mark}] {name}: {shown}")
        return "\n".join(self.lines)

    def _hdr(self, title: str, cols: str) -> None:
        self.out("")
        self.out(title)
        self.out(cols)

    def wrk_section(self, sc: str, title: str, ratios: bool) -> None:
        if not self.params(sc):
            return
        self._hdr(title, f"  {'':<7} {'target':<9} {'req/s':>26} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} "
                         f"{'CPU µs/req':>20} {'CPU%':>5} {'other% P/L':>11}")
        for param in self.params(sc):
            for t in self.targets(sc, param):
                errs = self.get(sc, param, t, "errors")
                self.out(f"  {param:<7} {t:<9} {span(self.get(sc, param, t, 'rps')):>26} "
                         f"{fmt(med(self.get(sc, param, t, 'p50_ms')), 2):>9} "
                         f"{fmt(med(self.get(sc, param, t, 'p99_ms')), 2):>9} {sum(errs):>7} "
                         f"{span(self.get(sc, param, t, 'cpu_us')):>20} "
                         f"{fmt(med(self.get(sc, param, t, 'cpu_util_pct'))):>5} "
                         f"{self.other(sc, param, t):>11}")
            if ratios:
                cpu = self.paired(sc, param, "gateway", "floor", "cpu_us")
                thr = self.paired(sc, param, "gateway", "nginx", "rps")
                self.out(f"  {param:<7} ratios    gateway/floor CPU {span(cpu, 2)}; gateway/nginx req/s "
                         f"{span(thr, 3)}; nginx CPU µs/req {fmt(med(self.get(sc, param, 'nginx', 'cpu_us')))}")
                if sc == "1":
                    self.check(f"cache miss CPU ≤ 1.4 × floor ({param})", f"{fmt(med(cpu), 2)} ×",
                               med(cpu) <= 1.4 if cpu else None)
                    if param == "c=500":
                        self.check("cache miss throughput at c=500 ≥ 15% of nginx", f"{fmt(med(thr) * 100, 1)}%",
                                   med(thr) >= 0.15 if thr else None)
                    if param == "c=1000":
                        errs = sum(self.get(sc, param, "gateway", "errors"))
                        self.check("no errors at c=1000 (cache miss)", f"{errs} errors", errs == 0)
                else:
                    hits = [x.m.get("hit_checked") for x in self.r if x.scenario == sc and x.target == "gateway"]
                    self.check(f"cache hit CPU ≤ 1.15 × floor ({param})", f"{fmt(med(cpu), 2)} × (X-Cache: "
                               f"{','.join(sorted(set(str(h) for h in hits)))})", med(cpu) <= 1.15 if cpu else None)

    def slow_section(self) -> None:
        sc = "3"
        if not self.params(sc):
            return
        self._hdr("3. backend answering after 1 s (latency added over direct)",
                  f"  {'':<7} {'target':<9} {'req/s':>10} {'p50 ms':>10} {'p99 ms':>10} {'errors':>7} "
                  f"{'added p50 ms':>22} {'added p99 ms':>22} {'CPU µs/req':>12} {'other% P/L':>11}")
        sub = lambda x, y: x - y  # noqa: E731
        for param in self.params(sc):
            for t in self.targets(sc, param):
                add50 = self.paired(sc, param, t, "direct", "p50_ms", op=sub) if t != "direct" else []
                add99 = self.paired(sc, param, t, "direct", "p99_ms", op=sub) if t != "direct" else []
                self.out(f"  {param:<7} {t:<9} {fmt(med(self.get(sc, param, t, 'rps'))):>10} "
                         f"{fmt(med(self.get(sc, param, t, 'p50_ms')), 1):>10} "
                         f"{fmt(med(self.get(sc, param, t, 'p99_ms')), 1):>10} "
                         f"{sum(self.get(sc, param, t, 'errors')):>7} {span(add50, 2):>22} {span(add99, 2):>22} "
                         f"{fmt(med(self.get(sc, param, t, 'cpu_us'))):>12} "
                         f"{self.other(sc, param, t):>11}")
                if t == "gateway" and param == "c=1000":
                    self.check("1 s backend at c=1000: added p99 ≤ 10 ms", f"{fmt(med(add99), 2)} ms",
                               med(add99) <= 10 if add99 else None)

    def sse_section(self) -> None:
        sc = "4"
        if not self.params(sc):
            return
        self._hdr("4. SSE streams, 20 events 50 ms apart (TTFT from request sent to first event)",
                  f"  {'':<7} {'target':<9} {'streams':>8} {'intact':>8} {'TTFT p50 ms':>18} "
                  f"{'TTFT p99 ms':>20} {'added p99 ms':>16} {'RSS MB':>16} {'CPU µs/stream':>14} {'other% P/L':>11}")
        sub = lambda x, y: x - y  # noqa: E731
        for param in self.params(sc):
            for t in self.targets(sc, param):
                streams = sum(self.get(sc, param, t, "streams"))
                ok = sum(self.get(sc, param, t, "ok"))
                add99 = self.paired(sc, param, t, "direct", "ttft_p99_ms", op=sub) if t != "direct" else []
                self.out(f"  {param:<7} {t:<9} {streams:>8} {ok:>8} "
                         f"{span(self.get(sc, param, t, 'ttft_p50_ms'), 1):>18} "
                         f"{span(self.get(sc, param, t, 'ttft_p99_ms'), 1):>20} {span(add99, 1):>16} "
                         f"{span(self.get(sc, param, t, 'rss_mb'), 1):>16} "
                         f"{fmt(med(self.get(sc, param, t, 'cpu_us_per_stream'))):>14} "
                         f"{self.other(sc, param, t):>11}")
            rss = self.paired(sc, param, "gateway", "nginx", "rss_mb")
            add_n = self.paired(sc, param, "gateway", "nginx", "ttft_p99_ms", op=sub)
            self.out(f"  {param:<7} ratios    gateway/nginx RSS {span(rss, 1)}; gateway TTFT p99 over nginx "
                     f"{span(add_n, 1)} ms")
            add99 = self.paired(sc, param, "gateway", "direct", "ttft_p99_ms", op=sub)
            if param == "C=500":
                self.check("SSE C=500: TTFT p99 ≤ direct + 10 ms", f"+{fmt(med(add99), 1)} ms",
                           med(add99) <= 10 if add99 else None)
            if param == "C=1000":
                streams = sum(self.get(sc, param, "gateway", "streams"))
                ok = sum(self.get(sc, param, "gateway", "ok"))
                self.check("SSE C=1000: every stream intact", f"{ok}/{streams} byte-identical",
                           ok == streams and streams > 0)
                self.check("SSE C=1000: gateway RSS ≤ 3 × nginx's", f"{fmt(med(rss), 1)} ×",
                           med(rss) <= 3 if rss else None)

    def big_section(self) -> None:
        sc = "5"
        if not self.params(sc):
            return
        self._hdr("5. one large streamed answer, read slowly (64 KiB every few ms)",
                  f"  {'':<7} {'target':<9} {'ok':>4} {'seconds':>8} {'RSS before MB':>14} {'peak MB':>9} "
                  f"{'growth MB':>16} {'CPU s':>7} {'other% P/L':>11}")
        for param in self.params(sc):
            for t in self.targets(sc, param):
                oks = self.get(sc, param, t, "ok")
                self.out(f"  {param:<7} {t:<9} {'yes' if oks and all(oks) else 'NO':>4} "
                         f"{fmt(med(self.get(sc, param, t, 'seconds')), 1):>8} "
                         f"{fmt(med(self.get(sc, param, t, 'rss_base_mb')), 1):>14} "
                         f"{fmt(med(self.get(sc, param, t, 'rss_peak_mb')), 1):>9} "
                         f"{span(self.get(sc, param, t, 'growth_mb'), 2):>16} "
                         f"{fmt(med(self.get(sc, param, t, 'cpu_s')), 2):>7} "
                         f"{self.other(sc, param, t):>11}")
            growth = self.get(sc, param, "gateway", "growth_mb")
            oks = self.get(sc, param, "gateway", "ok")
            self.check(f"{param} stream: gateway peak RSS growth ≤ 10 MB",
                       f"{fmt(max(growth, default=float('nan')), 2)} MB (worst round)"
                       + ("" if oks and all(oks) else ", STREAM INCOMPLETE"),
                       (max(growth) <= 10 and all(oks)) if growth else None)

    def tls_section(self) -> None:
        sc = "6"
        if not self.params(sc):
            return
        self._hdr("6. HTTPS with keep-alive vs plain HTTP (cache miss)",
                  f"  {'':<7} {'target':<14} {'req/s':>26} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} "
                  f"{'CPU µs/req':>20} {'CPU%':>5} {'other% P/L':>11}")
        for param in self.params(sc):
            for t in self.targets(sc, param):
                self.out(f"  {param:<7} {t:<14} {span(self.get(sc, param, t, 'rps')):>26} "
                         f"{fmt(med(self.get(sc, param, t, 'p50_ms')), 2):>9} "
                         f"{fmt(med(self.get(sc, param, t, 'p99_ms')), 2):>9} "
                         f"{sum(self.get(sc, param, t, 'errors')):>7} {span(self.get(sc, param, t, 'cpu_us')):>20} "
                         f"{fmt(med(self.get(sc, param, t, 'cpu_util_pct'))):>5} "
                         f"{self.other(sc, param, t):>11}")
            g = self.paired(sc, param, "gateway https", "gateway http", "rps")
            n = self.paired(sc, param, "nginx https", "nginx http", "rps")
            self.out(f"  {param:<7} ratios         https/http req/s: gateway {span(g, 2)}, nginx {span(n, 2)}")
            self.check("HTTPS keep-alive ≥ 60% of plain HTTP", f"{fmt(med(g) * 100, 0)}%",
                       med(g) >= 0.6 if g else None)


# ============================================================================ main

def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    ngx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return (f"{os.cpu_count()} CPUs ({model}), Linux {os.uname().release}, Python {sys.version.split()[0]}, "
            f"{wrk_v.split(' Copyright')[0]}, {ngx_v.replace('nginx version: ', '')}")


def revision() -> str:
    """The commit under test, and whether ntonix/ has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ntonix", "gunicorn.conf.py"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev + (" + uncommitted changes in ntonix/" if dirty else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, short runs (about 2 minutes)")
    p.add_argument("--only", default="1,2,3,4,5,6", help="scenarios to run, e.g. 1,4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    p.add_argument("--warmup", type=int, default=1, help="seconds of an unrecorded wrk run per target first")
    p.add_argument("--conns", default="50,500,1000", help="scenario 1 concurrency levels")
    p.add_argument("--slow-conns", default="500,1000", help="scenario 3 concurrency levels")
    p.add_argument("--slow-seconds", type=int, default=6, help="length of each scenario 3 run")
    p.add_argument("--sse-streams", default="500,1000", help="scenario 4 concurrent streams")
    p.add_argument("--sse-seconds", type=float, default=3.0, help="scenario 4: streams keep starting this long")
    p.add_argument("--big-mb", type=float, default=200.0)
    p.add_argument("--big-every", type=float, default=0.002, help="scenario 5: seconds between 64 KiB reads")
    p.add_argument("--tls-conns", type=int, default=50)
    p.add_argument("--worker-connections", type=int, default=4096,
                   help="server.worker_connections of gateway and floor (nginx: twice this)")
    p.add_argument("--pool-max", type=int, default=2048, help="gateway pool.max_size per backend")
    p.add_argument("--proxy-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="also write every run's figures here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    p.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                   help="instead of the scenarios: py-spy the gateway worker under scenario 1 load (c=500)")
    p.add_argument("--profile-native", action="store_true", help="with --profile: include native frames")
    p.add_argument("--profile-target", choices=("gateway", "floor"), default="gateway",
                   help="with --profile: which worker to sample")
    p.add_argument("--profile-out", metavar="FILE", help="with --profile: keep py-spy's raw (collapsed) stacks")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.seconds, a.warmup, a.slow_seconds, a.sse_seconds, a.big_mb = 1, 3, 1, 4, 2.0, 100.0
    a.conns = [int(x) for x in a.conns.split(",") if x]
    a.slow_conns = [int(x) for x in a.slow_conns.split(",") if x]
    a.sse_streams = [int(x) for x in a.sse_streams.split(",") if x]
    a.only = {x.strip() for x in a.only.split(",") if x.strip()}
    return a


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * 1024:
        print(f"warning: open files limit is {soft}; c=1000 needs more (ulimit -n 65536)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for tool in ("wrk", "nginx", "taskset"):
        if not shutil.which(tool):
            print(f"error: {tool} not found (scripts/bench installs wrk and nginx)", file=sys.stderr)
            return 1
    if (os.cpu_count() or 1) < 2:
        print("error: the bench pins proxy and load to two different CPUs; this machine has one", file=sys.stderr)
        return 1
    raise_nofile()
    os.sched_setaffinity(0, {a.load_cpu})  # this script's own work counts on the load side
    bench = Bench(a)

    def on_signal(sig: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (in the background)
    started = time.monotonic()
    head = [f"NTONIX bench, {time.strftime('%Y-%m-%d %H:%M:%S')}, revision {revision()}", f"machine: {machine()}",
            f"rounds {a.rounds}, wrk runs {a.seconds:g} s (-t1, pinned to CPU {a.load_cpu}), proxies on CPU "
            f"{a.proxy_cpu}, load average at start {os.getloadavg()[0]:.2f}"]
    print("\n".join(head), flush=True)
    print(f"(work directory {bench.dir})", flush=True)
    try:
        bench.fast = [bench.start_backend("backend-1"), bench.start_backend("backend-2")]
        if a.profile:
            summary = bench.profile()
            bench.stop_all()
            print("\n" + summary)
            shutil.rmtree(bench.dir, ignore_errors=True)
            return 0
        for key, fn in (("1", bench.s1_miss), ("2", bench.s2_hit), ("3", bench.s3_slow), ("4", bench.s4_sse),
                        ("5", bench.s5_big), ("6", bench.s6_tls)):
            if key in a.only:
                fn()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        bench.stop_all()
        if not a.keep:
            shutil.rmtree(bench.dir, ignore_errors=True)
        return 130
    except Exception:
        bench.stop_all()
        print(f"\n(logs kept in {bench.dir})", file=sys.stderr)
        raise
    bench.stop_all()
    table = Table(bench.results).render()
    elapsed = time.monotonic() - started
    print("\n" + "=" * 100)
    print("\n".join(head))
    print(f"duration {elapsed / 60:.1f} min, load average at end {os.getloadavg()[0]:.2f}, revision at end "
          f"{revision()}")
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps({"head": head, "results": [r.__dict__ for r in bench.results]},
                                           indent=1, default=str))
    if a.keep:
        print(f"(work directory kept: {bench.dir})")
    else:
        shutil.rmtree(bench.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
