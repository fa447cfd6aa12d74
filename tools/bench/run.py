"""The benchmark behind ``scripts/bench``: NTONIX as shipped and stripped, against nginx and the floor.

Run it through ``scripts/bench`` (which installs wrk and nginx and sets up .venv); see
docs/performance.md for the method and a full run's table.

Targets: *shipped* is the gateway started exactly as the README says
(``gunicorn -c gunicorn.conf.py ntonix.wsgi``, conf/ntonix.json) with only the backends, the
ports, the listen address and the number of workers set: cache, coalescing and access log on.
*stripped* is the same with the cache and the access log off. *nginx* is the equivalent C
reverse proxy, *floor* a minimal WSGI app on the same gunicorn/gevent settings, *direct* the
bench backend itself.

Layout on a 2-core machine: every proxy under test runs pinned to ``--proxy-cpu`` (0); the load
(wrk with one thread, the SSE and slow-read clients) and the two bench backends run pinned to
``--load-cpu`` (1). Within each scenario the targets are interleaved (A B C A B C ...) for
``--rounds`` rounds; the table shows the median of the rounds and their spread (min–max).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools import ROOT
from tools.bench import chart, nginx, wrk
from tools.bench.meter import Meter, RssSampler, file_share, rss_parts
from tools.bench.profile import summarize_profile
from tools.bench.report import CACHE_FLOOR, PROXY_FLOOR, Result, Table
from tools.procs import Child, clean_env, free_port, port_open, rss_and_shared, rss_bytes, tree, wait_until

PY = sys.executable
CHAT = "/v1/chat/completions"
SHIPPED, STRIPPED, BASELINE = "shipped", "stripped", "baseline"
SHIPPED_REDIS = "shipped+redis"  # --with-redis: as shipped, with cache.redis_url (several gateways' path)
BRIEF = ("rps", "p50_ms", "p99_ms", "errors", "cpu_us", "ttft_p50_ms", "ttft_p99_ms", "streams", "ok", "errors_detail",
         "rss_mb", "added_mb", "file_mb", "streams_mb", "kept_mb", "growth_mb", "first_error", "other_proxy_pct",
         "other_load_pct")
SCENARIOS = {"1": "cache miss", "2": "cache hit", "3": "slow backend", "4": "SSE", "5": "big stream", "6": "HTTPS",
             "7": "c=1 latency"}


@dataclass
class Proc:
    """A process the bench started, pinned to ``cpu``."""

    name: str
    child: Child
    cpu: int
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.child.pid


def http_request(port: int, method: str, path: str, body: bytes | None = None, tls: bool = False,
                 timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def gateway_env(variant: str, backends: list[int], port: int, workers: int, ssl_port: int = 0,
                cert_dir: Path | None = None, redis_url: str = "") -> dict[str, str]:
    """The environment that starts the gateway as shipped (or stripped): only backends, ports,
    the loopback address and the number of workers are set (and ``cache.redis_url`` with
    ``--redis-url``); everything else is the default of conf/ntonix.json and the configuration model."""
    env = {"NTONIX_BACKENDS": ",".join(f"127.0.0.1:{p}" for p in backends), "NTONIX_PORT": str(port),
           "NTONIX_SSL_PORT": str(ssl_port), "NTONIX_WORKERS": str(workers), "NTONIX_SERVER_HOST": "127.0.0.1"}
    if redis_url and variant != STRIPPED:
        env["NTONIX_CACHE_REDIS_URL"] = redis_url
    if variant == SHIPPED_REDIS and not redis_url:
        raise ValueError("shipped+redis needs a Redis URL")
    if cert_dir is not None:
        env |= {"NTONIX_SSL_CERT_FILE": str(cert_dir / "server.crt"),
                "NTONIX_SSL_KEY_FILE": str(cert_dir / "server.key")}
    if variant == STRIPPED:
        env |= {"NTONIX_CACHE_ENABLED": "false", "NTONIX_LOGGING_ACCESS_LOG": "false"}
    return env


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.dir = Path(tempfile.mkdtemp(prefix="ntonix-bench-"))
        os.chmod(self.dir, 0o755)  # nginx workers (nobody) create their temp files in here
        self.procs: list[Proc] = []
        self.results: list[Result] = []
        self.nonce = f"{os.getpid()}-{int(time.time())}"
        self.runs = 0
        for name, stagger in (("post.lua", False), ("post_stagger.lua", True)):
            (self.dir / name).write_text(wrk.lua_script(stagger))
        self.fast: list[Proc] = []

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, argv: list[str], cpu: int, env: dict[str, str] | None = None,
               cwd: Path = ROOT) -> Proc:
        child = Child(name, ["taskset", "-c", str(cpu), *argv], self.dir / f"{name}.log", env=clean_env(**(env or {})),
                      cwd=cwd)
        proc = Proc(name, child, cpu)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> None:
        if proc in self.procs:
            self.procs.remove(proc)
            proc.child.stop(timeout)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=10)

    def _listening(self, proc: Proc, port: int) -> None:
        wait_until(f"{proc.name} listening on {port}", lambda: port_open(port), proc.child, timeout=30)

    def _wait_ok(self, proc: Proc, port: int, timeout: float = 20.0) -> None:
        """Until a chat completion through ``proc`` answers 200 (its backends count as healthy)."""
        def ok() -> bool:
            return http_request(port, "POST", CHAT, b'{"model":"bench-model","messages":[]}')[0] == 200
        wait_until(f"a 200 from {proc.name}", ok, proc.child, timeout=timeout, every=0.1)

    def start_backend(self, name: str, delay: float = 0.0) -> Proc:
        port = free_port()
        argv = [PY, "-m", "tools.bench.backend", "--port", str(port)] + (["--delay", str(delay)] if delay else [])
        proc = self._spawn(name, argv, self.a.load_cpu)
        proc.port = port
        self._listening(proc, port)
        return proc

    def start_gateway(self, name: str, backends: list[Proc], variant: str, tls: bool = False) -> Proc:
        """``variant``: shipped, stripped, or baseline (shipped, from the ``--baseline`` tree)."""
        port = free_port()
        ssl_port = free_port() if tls else 0
        redis_url = self.a.with_redis if variant == SHIPPED_REDIS else self.a.redis_url
        env = gateway_env(variant, [b.port for b in backends], port, self.a.workers, ssl_port,
                          self.cert_dir if tls else None, redis_url)
        (self.dir / f"{name}.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        root = Path(self.a.baseline) if variant == BASELINE else ROOT
        proc = self._spawn(name, [PY, "-m", "gunicorn", "-c", "gunicorn.conf.py", "ntonix.wsgi"], self.a.proxy_cpu,
                           env, cwd=root)
        proc.port = port
        proc.extra["ssl_port"] = ssl_port
        self._listening(proc, port)
        if ssl_port:
            self._listening(proc, ssl_port)
        self._wait_ok(proc, port)
        return proc

    def start_gateways(self, tag: str, backends: list[Proc], tls: bool = False) -> list[tuple[str, Proc]]:
        variants = (SHIPPED, STRIPPED, *((BASELINE,) if self.a.baseline else ()),
                    *((SHIPPED_REDIS,) if self.a.with_redis else ()))
        return [(v, self.start_gateway(f"{v}-{tag}", backends, v, tls=tls)) for v in variants]

    def start_floor(self) -> Proc:
        port = free_port()
        proc = self._spawn("floor", [PY, "-m", "tools.bench.floor_app", "--port", str(port), "--workers",
                                     str(self.a.workers), "--worker-connections", "4096"], self.a.proxy_cpu)
        proc.port = port
        self._listening(proc, port)
        self._wait_ok(proc, port)
        return proc

    def start_proxy_floor(self, backend: Proc) -> Proc:
        port = free_port()
        proc = self._spawn("proxy-floor", [PY, "-m", "tools.bench.proxy_floor_app", "--port", str(port), "--backend",
                                           f"127.0.0.1:{backend.port}", "--workers", str(self.a.workers),
                                           "--worker-connections", "4096"], self.a.proxy_cpu)
        proc.port = port
        self._listening(proc, port)
        self._wait_ok(proc, port)
        return proc

    def start_cache_floor(self, backend: Proc, tag: str) -> Proc:
        port = free_port()
        cache_dir = self.dir / f"cache-floor-{tag}"
        proc = self._spawn(f"cache-floor-{tag}", [
            PY, "-m", "tools.bench.cache_floor_app", "--port", str(port), "--backend", f"127.0.0.1:{backend.port}",
            "--dir", str(cache_dir), "--workers", str(self.a.workers), "--worker-connections", "4096",
        ], self.a.proxy_cpu)
        proc.port = port
        self._listening(proc, port)
        self._wait_ok(proc, port)
        return proc

    def start_nginx(self, name: str, backends: list[Proc], cache: bool = False, tls: bool = False) -> Proc:
        port = free_port()
        ssl_port = free_port() if tls else 0
        prefix = self.dir / name
        prefix.mkdir(exist_ok=True)
        os.chmod(prefix, 0o755)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx.nginx_conf(prefix, port, [b.port for b in backends], cache=cache, ssl_port=ssl_port,
                                         cert_dir=self.cert_dir if tls else None, worker_connections=4096 * 2 + 64))
        proc = self._spawn(name, ["nginx", "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(conf)],
                           self.a.proxy_cpu)
        proc.port = port
        proc.extra["ssl_port"] = ssl_port
        self._listening(proc, port)
        self._wait_ok(proc, port)
        return proc

    @property
    def cert_dir(self) -> Path:
        d = self.dir / "cert"
        if not (d / "server.crt").exists():
            subprocess.run([PY, "-m", "tools.gen_dev_cert", "--out-dir", str(d)], check=True, cwd=ROOT,
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
        w = wrk.parse_done(out.stdout)
        if w is None:
            raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
        m: dict[str, Any] = wrk.figures(w)
        n = m["requests"]
        m["cpu_us"] = meter.target_cpu * 1e6 / n if n and target else float("nan")
        m["cpu_util_pct"] = meter.target_cpu / meter.wall * 100 if target else float("nan")
        m.update(meter.figures)
        return m

    def sse(self, ports: list[int], streams: int, target: Proc | None) -> dict[str, Any]:
        argv = ["taskset", "-c", str(self.a.load_cpu), PY, "-m", "tools.bench.sse_client",
                "--streams", str(streams), "--seconds", str(self.a.sse_seconds), "--ramp", "1",
                "--nonce", f"{self.nonce}-{self.runs}"]
        self.runs += 1
        for p in ports:
            argv += ["--port", str(p)]
        pids = tree(target.pid) if target else []
        sampler = RssSampler(target.pid, 0.1) if target else None
        base, base_parts = rss_and_shared(pids), rss_parts(pids)
        if sampler:
            sampler.start()
        with Meter(target, list(self.procs), self.a.proxy_cpu, self.a.load_cpu) as meter:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=self.a.sse_seconds + 120, cwd=ROOT)
        peak = sampler.stop() if sampler else 0
        try:
            r: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"SSE client failed: {out.stdout[-500:]} {out.stderr[-1500:]}") from None
        r["intact"] = r["ok"] == r["streams"] and r["streams"] > 0
        nan = float("nan")
        mb = 2**20
        r["rss_mb"] = peak / mb if target else nan
        r["rss_base_mb"] = base[0] / mb if target else nan
        r["added_mb"] = (peak - base[0]) / mb if target else nan  # RSS while open − RSS just before
        r["file_mb"] = r["streams_mb"] = nan
        if sampler:
            file_pages, rest = file_share(base, (peak, sampler.peak_shared))
            r["file_mb"], r["streams_mb"] = file_pages / mb, rest / mb  # the store's pages; the rest
            time.sleep(0.5)  # the last answers stored: what stays once the streams closed, by kind
            after = rss_parts(pids)
            r["kept_mb"] = {k: round((after[k] - base_parts[k]) / mb, 2) for k in base_parts}
        r["cpu_us_per_stream"] = meter.target_cpu * 1e6 / max(1, r["streams"]) if target else nan
        r.update(meter.figures)
        return r

    def slow_read(self, target: Proc) -> dict[str, Any]:
        # Warm up (pools, buffers, code paths), then measure growth over the settled baseline.
        subprocess.run([PY, "-m", "tools.bench.slow_reader", "--port", str(target.port), "--mb", "4",
                        "--every", "0"], capture_output=True, timeout=60, cwd=ROOT)
        time.sleep(0.3)
        base = rss_bytes(tree(target.pid))
        sampler = RssSampler(target.pid, 0.02)
        sampler.start()
        argv = ["taskset", "-c", str(self.a.load_cpu), PY, "-m", "tools.bench.slow_reader",
                "--port", str(target.port), "--mb", str(self.a.big_mb), "--every", str(self.a.big_every)]
        with Meter(target, list(self.procs), self.a.proxy_cpu, self.a.load_cpu) as meter:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
        peak = sampler.stop()
        r: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        r.update({"rss_base_mb": base / 2**20, "rss_peak_mb": peak / 2**20, "growth_mb": (peak - base) / 2**20,
                  "cpu_s": meter.target_cpu, **meter.figures})
        return r

    def record(self, scenario: str, param: str, target: str, rnd: int, m: dict[str, Any]) -> None:
        self.results.append(Result(scenario, param, target, rnd, m))
        brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in m.items()
                 if k in BRIEF and v not in ("", {})}
        print(f"   [{scenario} {param} r{rnd + 1}] {target:<14} {brief}", flush=True)

    def rounds(self, sc: str, param: str, targets: list[tuple[str, Proc]], conns: int, seconds: float,
               mode: str = "unique", stagger_ms: int = 0, measured: bool = True,
               after: Any = None) -> None:
        """Warm-up (unrecorded) per target, then ``--rounds`` interleaved rounds of wrk runs."""
        if self.a.targets:
            targets = [t for t in targets if t[0] in self.a.targets]
        if not stagger_ms:
            for _, proc in targets:
                self.wrk(f"http://127.0.0.1:{proc.port}{CHAT}", conns, self.a.warmup, None, mode=mode)
        for rnd in range(self.a.rounds):
            for name, proc in targets:
                m = self.wrk(f"http://127.0.0.1:{proc.port}{CHAT}", conns, seconds,
                             None if name == "direct" else proc, mode=mode, stagger_ms=stagger_ms)
                if after is not None:
                    after(name, proc, m)
                self.record(sc, param, name, rnd, m)

    # ------------------------------------------------------------------ scenarios
    def s1_miss(self) -> None:
        print("\n== 1. cache miss, small JSON (unique prompt per request)", flush=True)
        gws = self.start_gateways("miss", self.fast)
        ngx = self.start_nginx("nginx-proxy", self.fast)
        floor = self.start_floor()
        pfloor = self.start_proxy_floor(self.fast[0])
        cfloor = self.start_cache_floor(self.fast[0], "miss")
        try:
            for c in self.a.conns:
                targets = [*gws, ("nginx", ngx), ("floor", floor), (PROXY_FLOOR, pfloor), (CACHE_FLOOR, cfloor)]
                if c == 500:
                    targets.append(("direct", self.fast[0]))
                self.rounds("1", f"c={c}", targets, c, self.a.seconds)
        finally:
            for p in (floor, pfloor, cfloor, ngx, *(g for _, g in gws)):
                self.stop(p)

    def s2_hit(self) -> None:
        print("\n== 2. cache hit, c=500 (the same body every request)", flush=True)
        gw = self.start_gateway("shipped-hit", self.fast, SHIPPED)
        base = [(BASELINE, self.start_gateway("baseline-hit", self.fast, BASELINE))] if self.a.baseline else []
        ngx = self.start_nginx("nginx-cache", self.fast, cache=True)
        floor = self.start_floor()

        def check(name: str, proc: Proc, m: dict[str, Any]) -> None:
            if name != "floor":
                m["hit_checked"] = self._check_hit(proc)

        try:
            self.rounds("2", "c=500", [(SHIPPED, gw), *base, ("nginx", ngx), ("floor", floor)], 500, self.a.seconds,
                        mode="same", after=check)
        finally:
            for p in (floor, ngx, gw, *(b for _, b in base)):
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
        gws = self.start_gateways("slow", slow)
        ngx = self.start_nginx("nginx-slow", slow)
        try:
            for c in self.a.slow_conns:
                self.rounds("3", f"c={c}", [("direct", slow[0]), *gws, ("nginx", ngx)], c, self.a.slow_seconds,
                            stagger_ms=1000)
        finally:
            for p in (ngx, *(g for _, g in gws), *slow):
                self.stop(p)

    def s4_sse(self) -> None:
        print("\n== 4. SSE streams (20 events 50 ms apart)", flush=True)
        gws = self.start_gateways("sse", self.fast)
        ngx = self.start_nginx("nginx-sse", self.fast)
        try:
            targets: list[tuple[str, list[int], Proc | None]] = [("direct", [b.port for b in self.fast], None)]
            targets += [(v, [g.port], g) for v, g in gws] + [("nginx", [ngx.port], ngx)]
            if self.a.targets:  # direct stays: TTFT is reported over it
                targets = [t for t in targets if t[0] in self.a.targets or t[0] == "direct"]
            for streams in self.a.sse_streams:
                for rnd in range(self.a.rounds):
                    for name, ports, proc in targets:
                        self.record("4", f"C={streams}", name, rnd, self.sse(ports, streams, proc))
        finally:
            for p in (ngx, *(g for _, g in gws)):
                self.stop(p)

    def s5_big(self) -> None:
        print(f"\n== 5. one {self.a.big_mb:g} MB streamed answer, read slowly: peak RSS growth", flush=True)
        gws = self.start_gateways("big", self.fast)
        ngx = self.start_nginx("nginx-big", self.fast)
        try:
            for rnd in range(min(self.a.rounds, 2)):
                for name, proc in [*gws, ("nginx", ngx)]:
                    self.record("5", f"{self.a.big_mb:g} MB", name, rnd, self.slow_read(proc))
        finally:
            for p in (ngx, *(g for _, g in gws)):
                self.stop(p)

    def s6_tls(self) -> None:
        c = self.a.tls_conns
        print(f"\n== 6. HTTPS (keep-alive) vs plain HTTP, cache miss, c={c}", flush=True)
        gw = self.start_gateway("shipped-tls", self.fast, SHIPPED, tls=True)
        ngx = self.start_nginx("nginx-tls", self.fast, tls=True)
        try:
            targets = [(f"{SHIPPED} http", f"http://127.0.0.1:{gw.port}{CHAT}", gw),
                       (f"{SHIPPED} https", f"https://127.0.0.1:{gw.extra['ssl_port']}{CHAT}", gw),
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

    def s7_latency(self) -> None:
        print("\n== 7. one client, one request at a time (c=1): latency added over direct", flush=True)
        gws = self.start_gateways("c1", self.fast)
        ngx = self.start_nginx("nginx-c1", self.fast)
        pfloor = self.start_proxy_floor(self.fast[0])
        cfloor = self.start_cache_floor(self.fast[0], "c1")
        try:
            self.rounds("7", "c=1", [("direct", self.fast[0]), *gws, ("nginx", ngx), (PROXY_FLOOR, pfloor),
                                     (CACHE_FLOOR, cfloor)], 1, self.a.seconds)
        finally:
            for p in (ngx, pfloor, cfloor, *(g for _, g in gws)):
                self.stop(p)

    def profile(self) -> str:
        """py-spy on the gateway's (or the floor's) worker under scenario 1 or 2 load (c=500 unless
        ``--profile-conns``)."""
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():
            raise RuntimeError("py-spy not found (pip install -r requirements-dev.txt)")
        secs, target, mode = self.a.profile, self.a.profile_target, self.a.profile_mode
        gw = self.start_floor() if target == "floor" else self.start_gateway(f"{target}-profile", self.fast, target)
        try:
            workers = [p for p in tree(gw.pid) if p != gw.pid]
            conns = self.a.profile_conns
            self.wrk(f"http://127.0.0.1:{gw.port}{CHAT}", conns, self.a.warmup, None, mode=mode)
            raw = self.dir / "profile.txt"
            load = subprocess.Popen(["taskset", "-c", str(self.a.load_cpu), "wrk", "-t1", f"-c{conns}",
                                     f"-d{secs + 3}s", "-s", str(self.dir / "post.lua"),
                                     f"http://127.0.0.1:{gw.port}/", "--", mode, self.nonce, CHAT],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1)  # wrk's connections are up
                if self.a.profile_syscalls:
                    return self.count_syscalls(gw, workers[0], secs)
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

    def count_syscalls(self, gw: Proc, worker: int, secs: int) -> str:
        """``strace -c`` on the worker for ``secs`` under the load: system calls per request (strace
        slows the worker: the counts are what to read, not the times)."""
        if not shutil.which("strace"):
            raise RuntimeError("strace not found (apt-get install strace)")

        def served() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/metrics", timeout=10) as r:
                return int(json.loads(r.read())["requests_total"])

        before = served()
        tracer = subprocess.Popen(["taskset", "-c", str(self.a.load_cpu), "strace", "-c", "-f", "-p", str(worker)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(secs)
        tracer.send_signal(signal.SIGINT)
        table = tracer.communicate(timeout=30)[1]
        n = max(1, served() - before - 1)
        out = [f"{n} requests while traced; system calls per request:"]
        for line in table.splitlines():
            cols = line.split()
            if len(cols) >= 5 and cols[0][0].isdigit() and cols[3].isdigit():
                out.append(f"  {int(cols[3]) / n:7.2f}  {cols[-1]}")
        return "\n".join(out)


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
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ntonix", "gunicorn.conf.py", "conf"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev + (" + uncommitted changes in ntonix/" if dirty else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, short runs (about 3 minutes)")
    p.add_argument("--only", default="1,2,3,4,5,6,7",
                   help="scenarios to run, e.g. 1,4 (" + ", ".join(f"{k} {v}" for k, v in SCENARIOS.items()) + ")")
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
    p.add_argument("--workers", type=int, default=1, help="worker processes of the gateways and the floor")
    p.add_argument("--baseline", metavar="DIR", default="",
                   help="also measure the gateway as shipped from another checkout (e.g. `git worktree add "
                        "/tmp/base main`): a before/after in the same rounds")
    p.add_argument("--with-redis", default="", metavar="REDIS_URL",
                   help="also the gateway as shipped with cache.redis_url set to this (target shipped+redis): "
                        "the cross-gateway path's cost on a miss, Redis on vs off in the same rounds (#17)")
    p.add_argument("--redis-url", default="",
                   help="cache.redis_url of the gateways as shipped (and --baseline): e.g. the cross-gateway "
                        "path's cost, this tree against main, both on one redis-server (docs/scale-out.md)")
    p.add_argument("--targets", default="",
                   help="measure only these targets of the scenarios' wrk rounds, e.g. shipped,shipped+redis "
                        "(a quicker A/B; the target check then covers what was measured)")
    p.add_argument("--proxy-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="also write every run's figures here")
    p.add_argument("--chart", metavar="PNG", default=None,
                   help="draw the side-by-side chart here (default docs/performance.png; none with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    p.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                   help="instead of the scenarios: py-spy a worker for SECONDS under c=500 load")
    p.add_argument("--profile-native", action="store_true", help="with --profile: include native frames")
    p.add_argument("--profile-target", choices=(SHIPPED, STRIPPED, SHIPPED_REDIS, "floor"), default=SHIPPED,
                   help="with --profile: which worker to sample")
    p.add_argument("--profile-mode", choices=("unique", "same", "stream"), default="unique",
                   help="with --profile: unique bodies (cache miss), the same body (cache hit), or unique "
                        "streamed requests (SSE misses: 20 events 50 ms apart, as scenario 4)")
    p.add_argument("--profile-conns", type=int, default=500, metavar="N",
                   help="with --profile: wrk's connections during the profile (500; 1 for the one-client path)")
    p.add_argument("--profile-syscalls", action="store_true",
                   help="with --profile: count the worker's system calls per request (strace -c) instead")
    p.add_argument("--profile-out", metavar="FILE", help="with --profile: keep py-spy's raw (collapsed) stacks")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.seconds, a.warmup, a.slow_seconds, a.sse_seconds, a.big_mb = 1, 2, 1, 3, 1.5, 50.0
    if a.baseline and not (Path(a.baseline) / "ntonix" / "wsgi.py").exists():
        p.error(f"--baseline {a.baseline}: no ntonix/wsgi.py there")
    if a.chart is None:
        a.chart = "" if a.quick else str(ROOT / "docs" / "performance.png")
    a.conns = [int(x) for x in a.conns.split(",") if x]
    a.slow_conns = [int(x) for x in a.slow_conns.split(",") if x]
    a.sse_streams = [int(x) for x in a.sse_streams.split(",") if x]
    a.only = {x.strip() for x in a.only.split(",") if x.strip()}
    a.targets = {x.strip() for x in a.targets.split(",") if x.strip()}
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
            f"{a.proxy_cpu} ({a.workers} worker each), load average at start {os.getloadavg()[0]:.2f}"]
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
        for key, fn in (("7", bench.s7_latency), ("1", bench.s1_miss), ("2", bench.s2_hit), ("3", bench.s3_slow),
                        ("4", bench.s4_sse), ("5", bench.s5_big), ("6", bench.s6_tls)):
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
    table = Table(bench.results)
    text = table.render()
    elapsed = time.monotonic() - started
    print("\n" + "=" * 100)
    print("\n".join(head))
    print(f"duration {elapsed / 60:.1f} min, load average at end {os.getloadavg()[0]:.2f}, revision at end "
          f"{revision()}")
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"head": head, "results": [r.__dict__ for r in bench.results]},
                                           indent=1, default=str))
    if a.chart:
        print(chart.draw(bench.results, Path(a.chart), title=head[0]))
    if a.keep:
        print(f"(work directory kept: {bench.dir})")
    else:
        shutil.rmtree(bench.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
