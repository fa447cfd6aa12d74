"""The routing benchmark's processes: inference-mode mock backends (or real llama.cpp servers), nginx,
the NTONIX gateway, several gateways behind HAProxy (tools/scaleout.py's ``Topology``).

Each runs as a child on a free 127.0.0.1 port, through tests/live/procs.py's ``Proc`` (output in a
temporary log file; stopped by its PID, then its own process group).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tests.live.llamacpp import LlamaServer
from tests.live.procs import PYTHON, Proc, free_port, http, wait_http_up, wait_until
from tools.routing_bench.stats import BackendCounts
from tools.scaleout import Topology

HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class MockSpec:
    """How one inference-mode mock is started (``python -m mock_llm --inference ...``)."""

    name: str
    kv_cache_tokens: int
    prefill_time_per_token: float
    token_delay: float
    max_num_seqs: int
    stream_interval: int
    tokens: int
    models: tuple[str, ...] = ()

    def argv(self, port: int) -> list[str]:
        argv = [PYTHON, "-m", "mock_llm", "--inference", "--port", str(port), "--name", self.name,
                "--kv-cache-tokens", str(self.kv_cache_tokens),
                "--prefill-time-per-token", repr(self.prefill_time_per_token),
                "--token-delay", repr(self.token_delay), "--max-num-seqs", str(self.max_num_seqs),
                "--stream-interval", str(self.stream_interval), "--tokens", str(self.tokens)]
        if self.models:
            argv += ["--models", ",".join(self.models)]
        return argv


class BenchBackend(Protocol):
    """What the benchmark needs of a backend: a mock (``Backend``) or a real server (``LlamaBackend``)."""

    port: int

    @property
    def url(self) -> str: ...
    def serves(self, model: str) -> bool: ...
    def reset(self) -> None: ...
    def restart(self) -> None: ...
    def stop(self) -> None: ...
    def counts(self) -> BackendCounts: ...


@dataclass
class Backend:
    spec: MockSpec
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def serves(self, model: str) -> bool:
        return not self.spec.models or model in self.spec.models

    def metrics(self) -> dict[str, float]:
        """``GET /metrics`` as ``{name: value}`` (labels dropped: one model_name per mock)."""
        status, _, body = http("GET", self.url + "/metrics", timeout=10)
        if status != 200:
            raise RuntimeError(f"{self.spec.name}: GET /metrics -> {status}")
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = float(value)
        return out

    def reset(self) -> None:
        """Empty prefix cache and zero counters; waits until nothing runs any more."""
        wait_until(lambda: self.metrics()["vllm:num_requests_running"] == 0, timeout=60,
                   what=f"{self.spec.name} idle")
        status, _, _ = http("POST", self.url + "/_reset", body=b"")
        if status != 200:
            raise RuntimeError(f"{self.spec.name}: POST /_reset -> {status}")

    def restart(self) -> None:
        """Nothing: ``reset`` empties a mock's cache in place, with no gateway noticing."""

    def stop(self) -> None:
        self.proc.stop()

    def counts(self) -> BackendCounts:
        """Its counters since the last ``reset``."""
        m = self.metrics()
        return BackendCounts(
            requests=int(m["mock:requests_total"]), wrong_model=int(m["mock:requests_wrong_model_total"]),
            prompt_tokens=int(m["vllm:prompt_tokens_total"]),
            computed_tokens=int(m["mock:prompt_tokens_computed_total"]),
            cached_tokens=int(m["mock:prompt_tokens_cached_total"]),
            peak_in_system=int(m["mock:requests_in_system_peak"]))


class LlamaBackend:
    """A real llama.cpp server (tests/live/llamacpp.py: SmolLM2-135M, one thread) as a backend.

    llama.cpp can neither empty its prompt caches (the slots' and the host-RAM one) nor zero its
    counters over HTTP, so ``restart`` starts the process again on the same port (cold caches,
    zero counters); the benchmark restarts every backend before each target's proxy starts, so no
    gateway sees one go away. Answers are sent with ``ignore_eos``, each exactly ``answer_tokens``
    long, so requests per backend = tokens predicted ÷ ``answer_tokens``.
    """

    def __init__(self, name: str, slots: int, ctx: int, answer_tokens: int) -> None:
        self.server = LlamaServer(name, slots=slots, ctx=ctx)
        self.port = self.server.port
        self.answer_tokens = answer_tokens

    @property
    def url(self) -> str:
        return self.server.url

    def serves(self, model: str) -> bool:
        return True

    def metrics(self) -> dict[str, float]:
        return self.server.metrics()

    def reset(self) -> None:
        wait_until(lambda: self.server.busy_slots() == 0, timeout=60, what=f"{self.server.name} idle")

    def restart(self) -> None:
        self.server.stop()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def counts(self) -> BackendCounts:
        m = self.metrics()
        computed, cached = int(m["llamacpp:prompt_tokens_total"]), int(m["llamacpp:prompt_tokens_cached_total"])
        return BackendCounts(requests=round(m["llamacpp:tokens_predicted_total"] / self.answer_tokens),
                             prompt_tokens=computed + cached, computed_tokens=computed, cached_tokens=cached)


def scrub_environment() -> None:
    """A developer's NTONIX_* variables must not reach the gateways we start (as tests/conftest.py)."""
    for key in [k for k in os.environ if k.startswith(("NTONIX_", "PROMETHEUS_MULTIPROC_DIR"))]:
        del os.environ[key]


def start_backend(spec: MockSpec) -> Backend:
    port = free_port()
    proc = Proc(spec.argv(port), name=f"route-{spec.name}")
    wait_http_up(f"http://{HOST}:{port}/health", proc)
    return Backend(spec, port, proc)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def nginx_conf(prefix: Path, port: int, backends: list[int]) -> str:
    """A plain round-robin reverse proxy: HTTP/1.1 keep-alive upstream pool, no buffering."""
    upstream = "\n".join(f"        server {HOST}:{p};" for p in backends)
    temps = "\n".join(f"    {k}_temp_path {prefix / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# generated by tools/routing_bench/procs.py
worker_processes 1;
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temps}
    client_max_body_size 10m;
    upstream backends {{
{upstream}
        keepalive 256;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def start_nginx(folder: Path, backends: Sequence[BenchBackend]) -> tuple[Proc, int]:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx not found (Debian/Ubuntu: apt-get install nginx)")
    prefix = folder / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, [b.port for b in backends]))
    proc = Proc([binary, "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(conf)], name="route-nginx")
    wait_http_up(f"http://{HOST}:{port}/health", proc)
    return proc, port


def start_gateway(folder: Path, backends: Sequence[BenchBackend], workers: int, policy: str,
                  cache: bool, max_in_flight: int = 0, block_chars: int = 0) -> tuple[Proc, int]:
    """``python -m ntonix`` in front of ``backends``; ``NTONIX_ROUTING_POLICY`` set for any policy but
    the default (round_robin), and ``NTONIX_ROUTING_PREFIX_BLOCK_CHARS`` and ``backends[].max_in_flight``
    only when asked for, so that a gateway without routing keys still runs round_robin."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "server": {"host": HOST, "port": port, "ssl_port": 0, "threads": workers},
        "backends": [{"host": HOST, "port": b.port, "weight": 1,
                      **({"max_in_flight": max_in_flight} if max_in_flight else {})} for b in backends],
        "cache": {"enabled": cache, "dir": str(folder / "cache")},
        "proxy": {"read_timeout_s": 300},
        "health": {"interval_s": 1.0},
        "logging": {"level": "warning", "access_log": False},
    }
    path = folder / "ntonix.json"
    path.write_text(json.dumps(config, indent=2))
    env = {"NTONIX_ROUTING_POLICY": policy} if policy != "round_robin" else {}
    if block_chars:
        env["NTONIX_ROUTING_PREFIX_BLOCK_CHARS"] = str(block_chars)
    proc = Proc([PYTHON, "-m", "ntonix", "--config", str(path)], env=env, name=f"route-gateway-{policy}-w{workers}")
    wait_http_up(f"http://{HOST}:{port}/health", proc)
    # Until every backend passed a health check, the gateway would spread over fewer of them.
    wait_until(lambda: http("GET", f"http://{HOST}:{port}/health", timeout=2)[0] == 200, timeout=30,
               what="gateway healthy")
    return proc, port


def start_l4(folder: Path, backends: Sequence[BenchBackend], gateways: int, workers: int, policy: str,
             block_chars: int = 0) -> Topology:
    """``gateways`` gateways in front of ``backends``, sharing one redis-server, behind HAProxy in TCP
    mode (docs/scale-out.md); settings as ``start_gateway``'s, the cache off: Redis carries only the
    prefix affinity (ntonix/cluster/). Stop it with ``.stop()``."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {"NTONIX_CACHE_ENABLED": "false", "NTONIX_PROXY_READ_TIMEOUT_S": "300", "NTONIX_HEALTH_INTERVAL_S": "1",
           "NTONIX_LOGGING_LEVEL": "warning", "NTONIX_LOGGING_ACCESS_LOG": "false", "NTONIX_ROUTING_POLICY": policy}
    if block_chars:
        env["NTONIX_ROUTING_PREFIX_BLOCK_CHARS"] = str(block_chars)
    topo = Topology(gateways, workers=workers, log_dir=folder, backend_ports=[b.port for b in backends],
                    gateway_env=env)
    try:
        return topo.start()
    except BaseException:
        topo.stop()
        raise
