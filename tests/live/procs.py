"""Helpers for live tests: free ports, child processes, polling with a deadline.

Every process a test starts is stopped by its PID (never by name), and every wait
polls a condition until a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

T = TypeVar("T")


class GaveUp(RuntimeError):
    """Raised by a polled condition to stop waiting at once (the process died)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to 0, read, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except GaveUp:
            raise
        except Exception as exc:  # noqa: BLE001 - polled conditions may fail until ready
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


def http(
    method: str,
    url: str,
    body: bytes | dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with urllib; returns (status, headers with lower-case names, body)."""
    data: bytes | None
    hdrs = dict(headers or {})
    if isinstance(body, dict):
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    else:
        data = body
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def get_json(url: str, timeout: float = 10.0) -> Any:
    status, _, body = http("GET", url, timeout=timeout)
    return json.loads(body)


class Proc:
    """A child process with its output captured to a file, stopped by PID."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path = ROOT, name: str = "proc"):
        self.argv = list(argv)
        self.name = name
        fd, path = tempfile.mkstemp(prefix=f"ntonix-{name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # Not the hand-over variables of a gateway built in this process (ntonix/config/handover.py:
        # ``run_dir()`` sets _NTONIX_RUN_DIR): each process started here gets its own run directory.
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("_NTONIX_")}
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            self.argv, cwd=str(cwd), env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """TERM, wait, then KILL the process group if it is still there."""
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=5)
            except ProcessLookupError:
                pass
        # Children left behind in the session (gunicorn workers after a KILL of the master).
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return self.popen.returncode


def wait_http_up(url: str, proc: Proc | None = None, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers any HTTP status (the server is listening and serving)."""

    def up() -> bool:
        if proc is not None and not proc.alive():
            raise GaveUp(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.output()[-3000:]}")
        try:
            http("GET", url, timeout=2.0)
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    try:
        wait_until(up, timeout=timeout, what=url)
    except TimeoutError as exc:
        tail = proc.output()[-3000:] if proc is not None else ""
        raise TimeoutError(f"{exc}\n{tail}") from None


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` on a fresh connection; read until the peer closes (or resets) it.

    A peer that refuses the request before it was all sent (a 431, say) has answered already:
    a broken pipe while sending is not an error here."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-case headers, rest) of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


class Listener:
    """Something listening on ``host:port`` over plain HTTP (a backend the tests start)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port``, as the gateway names backends in /metrics."""
        return f"{self.host}:{self.port}"


def client_exchange(port: int, method: str, path: str, body: bytes | None = None,
                    headers: Mapping[str, str] | None = None, timeout: float = 10.0,
                    host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One request with http.client: exactly the headers given (plus Host, Content-Length)."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
