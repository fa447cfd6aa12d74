"""Several gateways as one, natively: the topology of compose.yaml's profile "scale" without a
container engine (docs/scale-out.md). Run it through ``scripts/scaleout``.

    scripts/scaleout                       # 2 gateways behind HAProxy on 127.0.0.1:8090
    scripts/scaleout --gateways 3          # N gateways
    scripts/scaleout --port 0 --workers 1  # any free port, one worker per gateway

Starts, on loopback: a ``redis-server`` (no persistence), two mock LLM backends
(``python -m mock_llm``), N gateways (the production command, ``gunicorn -c gunicorn.conf.py
ntonix.wsgi``, each with its own private cache folder, all with ``NTONIX_CACHE_REDIS_URL``
pointing at that Redis) and HAProxy in TCP mode in front of them, with
conf/haproxy-scale.cfg (extended to N ``server`` lines). Prints the addresses, then waits;
Ctrl-C or TERM stops every process it started, by PID. tests/integration/test_scaleout.py
uses :class:`Topology` directly.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_TEMPLATE = ROOT / "conf" / "haproxy-scale.cfg"
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find(tool: str) -> str:
    """``tool`` on PATH or in /usr/sbin (where Debian puts haproxy), else exit with a hint."""
    exe = shutil.which(tool) or shutil.which(tool, path="/usr/sbin")
    if exe is None:
        raise SystemExit(f"{tool} not found: apt-get install {tool}")
    return exe


def haproxy_config(gateways: int) -> str:
    """conf/haproxy-scale.cfg with one ``server`` line per gateway (``LB_GATEWAY_<n>``)."""
    text = HAPROXY_TEMPLATE.read_text()
    lines = [f'    server gateway-{i} "${{LB_GATEWAY_{i}}}"' for i in range(1, gateways + 1)]
    text, n = re.subn(r'(?m)^    server gateway-\d+ .*\n(    server gateway-\d+ .*\n)*', "\n".join(lines) + "\n", text)
    assert n == 1, "conf/haproxy-scale.cfg: expected one block of `server gateway-N` lines"
    return text


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback URLs we built
            return bool(resp.status == 200)
    except OSError:
        return False


class Topology:
    """Redis, two mock backends, ``gateways`` gateways and HAProxy, all on loopback.

    ``backend_ports``: backends already running (the routing benchmark's, tools/routing_bench/),
    then no mock is started; ``gateway_env``: more settings for every gateway (``NTONIX_*``).
    """

    def __init__(self, gateways: int = 2, port: int = 0, workers: int = 1, mock_ttft: float = 0.05,
                 mock_token_delay: float = 0.01, log_dir: Path | None = None,
                 backend_ports: Sequence[int] | None = None, gateway_env: Mapping[str, str] | None = None) -> None:
        self.n, self.workers = gateways, workers
        self.mock_ttft, self.mock_token_delay = mock_ttft, mock_token_delay
        self.dir = Path(tempfile.mkdtemp(prefix="ntonix-scaleout-"))
        self.log_dir = log_dir or self.dir
        self.redis_port = free_port()
        self.own_backends = backend_ports is None
        self.backend_ports = [free_port() for _ in range(2)] if backend_ports is None else list(backend_ports)
        self.gateway_env = dict(gateway_env or {})
        self.gateway_ports = [free_port() for _ in range(gateways)]
        self.lb_port = port or free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def lb_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.gateway_ports]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        try:
            self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        finally:
            log.close()

    def _wait(self, name: str, ready: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not _up(ready):
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.output(name)[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready at {ready} after {START_TIMEOUT:g}s: {self.output(name)[-2000:]}")
            time.sleep(0.1)

    def output(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def start(self) -> Topology:
        base = {k: v for k, v in os.environ.items() if not k.startswith("NTONIX_")}
        self._spawn("redis", [find("redis-server"), "--port", str(self.redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(self.dir)])
        for i, port in enumerate(self.backend_ports if self.own_backends else [], 1):
            self._spawn(f"backend-{i}", [sys.executable, "-m", "mock_llm", "--host", "127.0.0.1", "--port", str(port),
                                         "--name", f"backend-{i}", "--ttft", str(self.mock_ttft),
                                         "--token-delay", str(self.mock_token_delay)], env=base)
        for i, port in enumerate(self.backend_ports if self.own_backends else [], 1):
            self._wait(f"backend-{i}", f"http://127.0.0.1:{port}/health")
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        for i, port in enumerate(self.gateway_ports, 1):
            env = {**base, "NTONIX_SERVER_HOST": "127.0.0.1", "NTONIX_PORT": str(port), "NTONIX_SSL_PORT": "0",
                   "NTONIX_WORKERS": str(self.workers), "NTONIX_HEALTH_INTERVAL_S": "2",
                   "NTONIX_BACKENDS": ",".join(f"127.0.0.1:{p}" for p in self.backend_ports),
                   "NTONIX_CACHE_REDIS_URL": self.redis_url, **self.gateway_env}
            self._spawn(f"gateway-{i}", [gunicorn, "-c", "gunicorn.conf.py", "ntonix.wsgi"], env=env)
        for i, url in enumerate(self.gateway_urls, 1):
            self._wait(f"gateway-{i}", url + "/health")
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.n))
        env = {**base, "LB_BIND": f"127.0.0.1:{self.lb_port}",
               **{f"LB_GATEWAY_{i}": f"127.0.0.1:{p}" for i, p in enumerate(self.gateway_ports, 1)}}
        self._spawn("lb", [find("haproxy"), "-db", "-f", str(cfg)], env=env)
        self._wait("lb", self.lb_url + "/health")
        return self

    def stop(self) -> None:
        """TERM every process we started (last started first), KILL what is left after 15 s."""
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            del self.procs[name]
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Topology:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/scaleout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateways", type=int, default=2, help="how many gateways (default 2)")
    ap.add_argument("--port", type=int, default=8090, help="the balancer's port (0: any free one)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes per gateway (default 1)")
    ap.add_argument("--mock-ttft", type=float, default=0.3)
    ap.add_argument("--mock-token-delay", type=float, default=0.05)
    args = ap.parse_args(argv)
    if args.gateways < 1:
        ap.error("--gateways: at least 1")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with Topology(args.gateways, args.port, args.workers, args.mock_ttft, args.mock_token_delay) as topo:
        print(f"balancer   {topo.lb_url}   (HAProxy, TCP mode)")
        for i, url in enumerate(topo.gateway_urls, 1):
            print(f"gateway-{i}  {url}")
        print(f"redis      {topo.redis_url}")
        print(f"logs       {topo.log_dir}\nCtrl-C stops everything.", flush=True)
        try:
            while not stop and all(p.poll() is None for p in topo.procs.values()):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        dead = [n for n, p in topo.procs.items() if p.poll() is not None]
        if dead:
            print(f"stopped: {', '.join(dead)} exited", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
