"""Live-test building blocks behind the fixtures in ``tests/conftest.py``.

Each class wraps one child process started on a free loopback port with ``tests/live/procs.py``'s
``Proc`` (stopped by PID, never by name) and knows how to talk to it:

- ``MockBackend``: ``python -m mock_llm --port N --name NAME [--ttft S --token-delay S]``
- ``Gateway``: ``python -m ntonix --config FILE``, the file written from a dict per gateway
- ``RedisServer``: ``redis-server`` without persistence, restartable on the same port

Factories remember what they started and stop it all in ``close()`` (the fixtures' teardown).
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trustme

from tests.live.procs import PYTHON, GaveUp, Listener, Proc, free_port, get_json, http, wait_http_up, wait_until

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0


_STOPPED: weakref.WeakSet[Proc] = weakref.WeakSet()


def stop_once(proc: Proc, timeout: float = 15.0) -> int | None:
    """``proc.stop()`` the first time only: never signal a reaped PID (it may be reused)."""
    if proc not in _STOPPED:
        _STOPPED.add(proc)
        proc.stop(timeout=timeout)
    return proc.popen.returncode


def output_of(proc: Proc) -> str:
    """The process's output so far, also after it was stopped (its log file closed)."""
    try:
        return proc.output()
    except ValueError:  # flush on the closed log file
        return proc.log_path.read_text(errors="replace")


def _address_in_use(proc: Proc) -> bool:
    out = output_of(proc).lower()
    return "address already in use" in out or "errno 98" in out


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``: nested dicts merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ----------------------------------------------------------------------------- mock backend


class MockBackend(Listener):
    """One ``mock_llm`` process. ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(
        self, name: str, ttft: float = 0.0, token_delay: float = 0.0, extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.name = name
        self.host = LOOPBACK
        self.ttft = ttft
        self.token_delay = token_delay
        self.extra_args = tuple(extra_args)
        self.port = port or free_port()
        self.proc: Proc = self._launch(may_move=port is None)

    def argv(self) -> list[str]:
        return [
            PYTHON, "-m", "mock_llm", "--port", str(self.port), "--name", self.name,
            "--ttft", str(self.ttft), "--token-delay", str(self.token_delay), *self.extra_args,
        ]

    def _launch(self, may_move: bool) -> Proc:
        for attempt in range(3):
            proc = Proc(self.argv(), name=f"mock-{self.name}")
            try:
                wait_http_up(self.url + "/health", proc, timeout=START_TIMEOUT)
                return proc
            except (GaveUp, TimeoutError):
                stop_once(proc)
                if attempt < 2 and may_move and _address_in_use(proc):
                    self.port = free_port()  # lost a race for the port: take another
                    continue
                raise
        raise AssertionError("unreachable")

    # --- talking to it
    def stats(self) -> Any:
        """``GET /_stats`` as JSON: ``name requests by_path health_checks streams_started
        streams_completed streams_aborted streams_broken active_requests last_request``."""
        return get_json(self.url + "/_stats")

    def control(self, **settings: Any) -> Any:
        """``POST /_control`` with ``settings`` (``fail health_fail hang health_hang ttft token_delay
        tokens``) as the JSON body; returns all current settings."""
        status, _, body = http("POST", self.url + "/_control", body=dict(settings))
        assert status == 200, f"{self.name}: POST /_control {settings} -> {status} {body[:500]!r}"
        return json.loads(body) if body.strip() else None

    def reset(self) -> Any:
        """Back to the start-up settings (no failing, hanging; launch ttft/token_delay) and zeroed
        counters (``POST /_control``, then ``POST /_reset``); returns the zeroed stats."""
        self.control(ttft=self.ttft, token_delay=self.token_delay, fail=False, health_fail=False, hang=False,
                     health_hang=False, tokens=self._launch_tokens())
        status, _, body = http("POST", self.url + "/_reset", body=b"")
        assert status == 200, f"{self.name}: POST /_reset -> {status} {body[:500]!r}"
        return json.loads(body)

    def _launch_tokens(self) -> int:
        args = list(self.extra_args)
        for i, arg in enumerate(args):
            if arg == "--tokens" and i + 1 < len(args):
                return int(args[i + 1])
            if arg.startswith("--tokens="):
                return int(arg.partition("=")[2])
        return 8  # mock_llm's default

    # --- life cycle (outage tests)
    def alive(self) -> bool:
        return self.proc.alive()

    def output(self) -> str:
        return output_of(self.proc)

    def stop(self, *, quick: bool = False) -> None:
        """TERM: gunicorn's graceful stop, as a backend taken down for an outage test (it waits up
        to its graceful timeout, 5 s, for open keep-alive connections, e.g. a gateway's pool).
        ``quick``: INT first, gunicorn's quick shutdown (a test's teardown: nothing to wait for)."""
        self.proc.signal(signal.SIGCONT)  # a paused process cannot act on TERM
        if quick and self.proc not in _STOPPED and self.proc.alive():
            self.proc.signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # stop_once: TERM, then KILL
        stop_once(self.proc)

    def start(self) -> None:
        """Start again on the same port (after ``stop()``)."""
        if not self.proc.alive():
            stop_once(self.proc)
            self.proc = self._launch(may_move=False)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (timeouts, hung backend)."""
        self.proc.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.signal(signal.SIGCONT)

    def __repr__(self) -> str:
        state = "up" if self.proc.alive() else "down"
        return f"<MockBackend {self.name} {self.address} {state} pid={self.proc.pid}>"


class MockBackendFactory:
    """``factory(name=None, ttft=0.0, token_delay=0.0, extra_args=(), port=None) -> MockBackend``."""

    def __init__(self) -> None:
        self.started: list[MockBackend] = []

    def __call__(
        self, name: str | None = None, ttft: float = 0.0, token_delay: float = 0.0,
        extra_args: Sequence[str] = (), port: int | None = None,
    ) -> MockBackend:
        backend = MockBackend(name or f"b{len(self.started) + 1}", ttft, token_delay, extra_args, port)
        self.started.append(backend)
        return backend

    def close(self) -> None:
        for backend in reversed(self.started):
            backend.stop(quick=True)
        self.started.clear()


# ----------------------------------------------------------------------------- gateway

BackendSpec = Any  # MockBackend | "host:port[:weight]" | {"host", "port", "weight"} | (MockBackend | str, weight)


def backend_entry(spec: BackendSpec) -> dict[str, Any]:
    """One ``backends`` item of the JSON config from a test's shorthand."""
    if isinstance(spec, tuple):
        target, weight = spec
        return {**backend_entry(target), "weight": int(weight)}
    if isinstance(spec, MockBackend):
        return {"host": spec.host, "port": spec.port, "weight": 1}
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("["):  # [::1]:8001[:2]
            host, _, rest = text[1:].partition("]")
            parts = rest.lstrip(":").split(":")
        else:
            host, *parts = text.split(":")
        entry: dict[str, Any] = {"host": host, "port": int(parts[0]), "weight": 1}
        if len(parts) > 1:
            entry["weight"] = int(parts[1])
        return entry
    raise TypeError(f"backend spec not understood: {spec!r}")


def write_cert(ca: trustme.CA, folder: Path, stem: str, *identities: str) -> tuple[Path, Path]:
    """Issue a leaf for ``identities`` from ``ca``; write ``<stem>.crt`` (chain) and ``<stem>.key``."""
    leaf = ca.issue_cert(*identities)
    crt, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    leaf.cert_chain_pems[0].write_to_path(str(crt))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(crt), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return crt, key


class Gateway:
    """One ``python -m ntonix --config FILE`` process (gunicorn master and its workers).

    ``config`` is the dict written to ``config_path``; ``url``/``https_url`` point at
    127.0.0.1. With ``ssl=True`` the server certificate comes from ``ca`` (trustme), whose
    PEM is at ``ca_path``; ``ssl_context()`` trusts it.
    """

    def __init__(
        self, folder: Path, backends: Sequence[BackendSpec] = (), config: Mapping[str, Any] | None = None,
        workers: int = 1, ssl: bool = False, env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (), ca: trustme.CA | None = None, wait: bool = True,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "ntonix.json"
        self.env = dict(env or {})
        self.extra_args = tuple(extra_args)
        self.ca: trustme.CA | None = None
        self.ca_path: Path | None = None
        if ssl:
            self.ca = ca or trustme.CA()
            self.ca_path = folder / "ca.pem"
            self.ca.cert_pem.write_to_path(str(self.ca_path))
            write_cert(self.ca, folder, "server", "localhost", LOOPBACK, "::1")
        base: dict[str, Any] = {
            "server": {"host": LOOPBACK, "port": free_port(), "ssl_port": free_port() if ssl else 0,
                       "threads": workers},
            "backends": [backend_entry(b) for b in backends],
            "cache": {"dir": str(folder / "cache")},
            "logging": {"level": "info"},
        }
        if ssl:
            base["ssl"] = {"cert_file": "server.crt", "key_file": "server.key"}
        self.config: dict[str, Any] = deep_merge(base, config or {})
        self.write_config()
        self.proc = Proc(self.argv(), env=self.env, name="gateway")
        if wait:
            self.wait_ready()

    # --- addresses
    @property
    def port(self) -> int:
        return int(self.config["server"]["port"])

    @property
    def ssl_port(self) -> int | None:
        return int(self.config["server"]["ssl_port"]) or None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def https_url(self) -> str:
        assert self.ssl_port, "gateway started without ssl=True"
        return f"https://{LOOPBACK}:{self.ssl_port}"

    @property
    def pid(self) -> int:
        """The master's PID (signals: HUP reloads, TERM drains)."""
        return self.proc.pid

    def argv(self) -> list[str]:
        return [PYTHON, "-m", "ntonix", "--config", str(self.config_path), *self.extra_args]

    # --- start-up
    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until GET /health answers (any status) on HTTP, and on HTTPS when enabled."""
        wait_http_up(self.url + "/health", self.proc, timeout=timeout)
        if self.ssl_port:
            def tls_up() -> bool:
                if not self.proc.alive():
                    raise GaveUp(f"gateway exited with {self.proc.popen.returncode}:\n{self.output()[-3000:]}")
                try:
                    self.request("GET", "/health", https=True, timeout=2.0)
                    return True
                except (urllib.error.URLError, OSError):
                    return False
            wait_until(tls_up, timeout=timeout, what=self.https_url + "/health")

    # --- talking to it
    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this gateway's CA."""
        assert self.ca is not None, "gateway started without ssl=True"
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def request(
        self, method: str, path: str, body: bytes | dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None, timeout: float = 10.0, https: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request to the gateway; ``(status, lower-case headers, body)``, errors included."""
        if not https:
            return http(method, self.url + path, body=body, headers=headers, timeout=timeout)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        hdrs = dict(headers or {})
        if isinstance(body, dict):
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.https_url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()

    def health(self) -> tuple[int, Any]:
        """``GET /health``: ``(status, JSON body)``; 200 while a backend is healthy, else 503."""
        status, _, body = self.request("GET", "/health")
        return status, json.loads(body)

    def metrics(self) -> Any:
        """``GET /metrics`` as JSON (whole gateway, all workers)."""
        status, _, body = self.request("GET", "/metrics")
        assert status == 200, f"/metrics -> {status} {body[:300]!r}"
        return json.loads(body)

    def cache_stats(self) -> Any:
        status, _, body = self.request("GET", "/cache/stats")
        assert status == 200, f"/cache/stats -> {status} {body[:300]!r}"
        return json.loads(body)

    # --- changing it
    def write_config(self, changes: Mapping[str, Any] | None = None) -> None:
        """Merge ``changes`` into ``config`` and rewrite the file (atomically); no signal sent."""
        if changes:
            self.config = deep_merge(self.config, changes)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.config, indent=2))
        tmp.replace(self.config_path)

    def set_backends(self, backends: Sequence[BackendSpec]) -> None:
        """Replace the backend list in the file (then ``reload()``)."""
        self.config["backends"] = [backend_entry(b) for b in backends]
        self.write_config()

    def reload(self) -> None:
        """``kill -HUP <master>``: re-read file and environment."""
        self.proc.signal(signal.SIGHUP)

    def signal(self, sig: int) -> None:
        self.proc.signal(sig)

    def output(self) -> str:
        return output_of(self.proc)

    def alive(self) -> bool:
        return self.proc.alive()

    def stop(self, timeout: float = 15.0) -> int | None:
        """TERM, wait up to ``timeout``, then KILL the whole process group; the exit status."""
        return stop_once(self.proc, timeout=timeout)

    def __repr__(self) -> str:
        state = "up" if self.proc.alive() else f"exited {self.proc.popen.returncode}"
        return f"<Gateway {self.url} ssl_port={self.ssl_port} pid={self.proc.pid} {state}>"


class GatewayFactory:
    """``factory(backends=(), config=None, workers=1, ssl=False, env=None, extra_args=(), ca=None,
    wait=True) -> Gateway``; every gateway gets its own folder under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[Gateway] = []

    def __call__(
        self, backends: Sequence[BackendSpec] = (), config: Mapping[str, Any] | None = None, workers: int = 1,
        ssl: bool = False, env: Mapping[str, str] | None = None, extra_args: Sequence[str] = (),
        ca: trustme.CA | None = None, wait: bool = True,
    ) -> Gateway:
        folder = self.base / f"gateway-{len(self.started) + 1}"
        for attempt in range(3):
            gw = Gateway(folder, backends, config, workers, ssl, env, extra_args, ca, wait=False)
            self.started.append(gw)
            if not wait:
                return gw
            try:
                gw.wait_ready()
                return gw
            except (GaveUp, TimeoutError):
                gw.stop()
                ports_fixed = "port" in (config or {}).get("server", {})
                if attempt < 2 and not ports_fixed and _address_in_use(gw.proc):
                    continue  # lost a race for a free port: try again with new ones
                raise
        raise AssertionError("unreachable")

    def close(self) -> list[Gateway]:
        """Stop every gateway; returns them (their output stays readable)."""
        stopped = list(reversed(self.started))
        for gw in stopped:
            gw.stop()
        self.started.clear()
        return stopped


# ----------------------------------------------------------------------------- redis


class RedisServer:
    """``redis-server`` on a free loopback port, no persistence; ``stop()``/``start()`` for outages."""

    def __init__(self, tls: trustme.CA | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: scripts/test installs it (apt-get install redis-server)")
        self.exe = exe
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ntonix-redis-"))
        self.tls_port = 0
        if tls is not None:  # also a TLS port, with a certificate for 127.0.0.1 from ``tls``
            self.tls_port = free_port()
            write_cert(tls, self.dir, "redis", LOOPBACK, "localhost")
            tls.cert_pem.write_to_path(str(self.dir / "ca.pem"))
        self.proc: Proc | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """The same Redis through its Unix socket."""
        return f"unix://{self.dir}/redis.sock"

    @property
    def tls_url(self) -> str:
        """The same Redis over TLS (``RedisServer(tls=ca)``), its certificate checked against the CA."""
        return f"rediss://{LOOPBACK}:{self.tls_port}/0?ssl_ca_certs={self.dir}/ca.pem"

    def argv(self) -> list[str]:
        tls = ["--tls-port", str(self.tls_port), "--tls-cert-file", str(self.dir / "redis.crt"),
               "--tls-key-file", str(self.dir / "redis.key"), "--tls-ca-cert-file", str(self.dir / "ca.pem"),
               "--tls-auth-clients", "no"] if self.tls_port else []
        return [
            self.exe, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--daemonize", "no", "--logfile", "",
            "--unixsocket", str(self.dir / "redis.sock"), "--unixsocketperm", "700", *tls,
        ]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def ping(self, timeout: float = 1.0) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        """Start (again) on the same port and wait for PING."""
        if self.alive():
            return
        self.proc = Proc(self.argv(), name="redis")
        proc = self.proc

        def ready() -> bool:
            if not proc.alive():
                raise GaveUp(f"redis-server exited with {proc.popen.returncode}:\n{output_of(proc)[-2000:]}")
            return self.ping()

        wait_until(ready, timeout=START_TIMEOUT, what=f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_once(self.proc)
        # Wait until the port is really closed, so an outage test sees refused connections.
        deadline = time.monotonic() + 5
        while self.ping(timeout=0.2) and time.monotonic() < deadline:
            time.sleep(0.02)

    def command(self, *args: str) -> bytes:
        """One raw RESP command (e.g. ``command("FLUSHALL")``); returns the raw reply."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
        )
        with socket.create_connection((LOOPBACK, self.port), timeout=5) as s:
            s.sendall(payload)
            return s.recv(65536)

    def flush(self) -> None:
        reply = self.command("FLUSHALL")
        assert reply.startswith(b"+OK"), reply

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} {'up' if self.alive() else 'down'}>"
