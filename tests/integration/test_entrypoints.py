"""The two entry points: ``python -m ntonix [options]`` and ``gunicorn -c gunicorn.conf.py ntonix.wsgi``.

Both run from the project folder, as an operator would. Invalid configuration must stop
start-up with exit status 2 and exactly one line on stderr naming the key, no traceback;
a valid one serves; command line > environment > file, checked on a live listener.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.live.procs import PYTHON, ROOT, Proc, free_port, http, wait_http_up
from tests.live.servers import MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration


def gunicorn_exe() -> str:
    beside = Path(sys.executable).parent / "gunicorn"
    found = str(beside) if beside.exists() else shutil.which("gunicorn")
    assert found, "gunicorn is not installed next to the test interpreter"
    return found


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NTONIX_", "_NTONIX_"))}
    env.update(extra or {})
    return env


def run(argv: list[str], env: Mapping[str, str] | None = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run to completion; a process that starts serving instead of exiting is killed and fails the test."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv} did not exit within {timeout}s\nstdout: {out}\nstderr: {err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def write_config(folder: Path, data: Any, name: str = "ntonix.json") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def valid(port: int | None = None, backend: str = "127.0.0.1:9") -> dict[str, Any]:
    host, _, bport = backend.rpartition(":")
    return {"server": {"host": "127.0.0.1", "port": port or free_port(), "ssl_port": 0, "threads": 1},
            "backends": [{"host": host, "port": int(bport)}]}


def assert_one_line_naming(result: subprocess.CompletedProcess[str], key: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert key in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


# ----------------------------------------------------------------------------- --help, --check-config


def test_help() -> None:
    result = run([PYTHON, "-m", "ntonix", "--help"])
    assert result.returncode == 0, result.stderr
    for option in ("--config", "--port", "--ssl-port", "--workers", "--backends", "--log-level", "--check-config"):
        assert option in result.stdout, option
    assert result.stderr == ""


def test_check_config_valid(tmp_path: Path) -> None:
    path = write_config(tmp_path, valid(port=18123))
    result = run([PYTHON, "-m", "ntonix", "--check-config", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "18123" in result.stdout


def test_check_config_seed_schema(tmp_path: Path) -> None:
    seed = json.loads((ROOT / "conf" / "ntonix.json").read_text())
    path = write_config(tmp_path, seed)
    # The seed's certificate files, next to the config file: a real pair, as --check-config loads them.
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    result = run([PYTHON, "-m", "ntonix", "--check-config", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    assert "4 workers" in result.stdout


@pytest.mark.parametrize(("config", "env", "args", "key"), [
    ({"server": {"port": 80000}}, {}, [], "server.port"),
    ({"server": {"bogus": 1}}, {}, [], "server.bogus"),
    ({"sever": {}}, {}, [], "sever"),
    ({"backends": []}, {}, [], "backends"),
    ({"backends": [{"host": "a", "port": 1, "weight": 0}]}, {}, [], "backends[0].weight"),
    ({"server": {"ssl_port": 8443}, "ssl": {"cert_file": "missing.crt"}}, {}, [], "ssl.cert_file"),
    ({"logging": {"level": "chatty"}}, {}, [], "logging.level"),
    ({"logging": {"file": "/tmp"}}, {}, [], "logging.file"),
    ({"logging": {"max_bytes": -5}}, {}, [], "logging.max_bytes"),
    ({}, {"NTONIX_BOGUS": "1"}, [], "NTONIX_BOGUS"),
    ({}, {"NTONIX_PORT": "http"}, [], "server.port"),
    ({}, {"NTONIX_BACKENDS": "nohost"}, [], "NTONIX_BACKENDS"),
    ({}, {}, ["--workers", "0"], "server.threads"),
    ({}, {}, ["--backends", "x"], "--backends"),
    ({"server": {"host": "192.0.2.1"}}, {}, [], "server.host"),
], ids=["port-range", "unknown-key", "unknown-section", "no-backends", "weight-0", "missing-cert", "log-level",
        "log-file-is-a-folder", "log-rotation-negative", "unknown-variable", "env-type", "env-backends",
        "cli-workers", "cli-backends", "host-not-here"])
def test_check_config_invalid(tmp_path: Path, config: dict[str, Any], env: dict[str, str], args: list[str],
                              key: str) -> None:
    data = valid()
    for section, value in config.items():
        data[section] = {**data.get(section, {}), **value} if isinstance(value, dict) else value
    path = write_config(tmp_path, data)
    result = run([PYTHON, "-m", "ntonix", "--check-config", "--config", str(path), *args], env=env)
    assert_one_line_naming(result, key)
    assert result.stdout == ""


def test_check_config_unreadable_json(tmp_path: Path) -> None:
    path = write_config(tmp_path, '{"server": {"port": 8080,}}')
    assert_one_line_naming(run([PYTHON, "-m", "ntonix", "--check-config", "--config", str(path)]), "config file")


def test_check_config_certificate_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("not a certificate")
    (tmp_path / "server.key").write_text("not a key")
    data = valid()
    data["server"]["ssl_port"] = free_port()
    path = write_config(tmp_path, data)
    assert_one_line_naming(run([PYTHON, "-m", "ntonix", "--check-config", "--config", str(path)]), "ssl.")


# ----------------------------------------------------------------------------- invalid config stops start-up


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    data = valid()
    data["proxy"] = {"read_timeout_s": "soon"}
    return write_config(tmp_path, data, "bad.json")


def test_python_m_ntonix_refuses_invalid_config(bad_config: Path) -> None:
    result = run([PYTHON, "-m", "ntonix", "--config", str(bad_config)])
    assert_one_line_naming(result, "proxy.read_timeout_s")


def test_gunicorn_refuses_invalid_config(bad_config: Path) -> None:
    result = run([gunicorn_exe(), "-c", "gunicorn.conf.py", "ntonix.wsgi"], env={"NTONIX_CONFIG": str(bad_config)})
    assert_one_line_naming(result, "proxy.read_timeout_s")


def test_gunicorn_refuses_invalid_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, valid())
    result = run([gunicorn_exe(), "-c", "gunicorn.conf.py", "ntonix.wsgi"],
                 env={"NTONIX_CONFIG": str(path), "NTONIX_WORKERS": "none"})
    assert_one_line_naming(result, "server.threads")


# ----------------------------------------------------------------------------- serving


@pytest.fixture
def backend(mock_backend: MockBackendFactory) -> MockBackend:
    return mock_backend("ep")


@pytest.fixture
def started() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for proc in procs:
        proc.stop()


def start(started: list[Proc], argv: list[str], env: Mapping[str, str] | None = None) -> Proc:
    proc = Proc(argv, env=dict(env or {}), name="entrypoint")
    started.append(proc)
    return proc


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_gunicorn_entry_point_proxies(tmp_path: Path, backend: MockBackend, started: list[Proc]) -> None:
    data = valid(backend=backend.address)
    path = write_config(tmp_path, data)
    proc = start(started, [gunicorn_exe(), "-c", "gunicorn.conf.py", "ntonix.wsgi"], env={"NTONIX_CONFIG": str(path)})
    url = f"http://127.0.0.1:{data['server']['port']}"
    wait_http_up(url + "/health", proc)
    status, headers, body = http("POST", url + "/echo/via-gunicorn", body=b"hello")
    assert status == 200
    assert headers["x-mock-instance"] == "ep"
    assert json.loads(body)["body"] == "hello"
    status, _, body = http("POST", url + "/v1/chat/completions",
                           body={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body
    assert proc.stop() == 0  # TERM: a clean exit


def test_cli_beats_environment_beats_file(tmp_path: Path, backend: MockBackend, started: list[Proc]) -> None:
    file_port, env_port, cli_port = free_port(), free_port(), free_port()
    path = write_config(tmp_path, valid(port=file_port, backend=backend.address))
    proc = start(started, [PYTHON, "-m", "ntonix", "--config", str(path), "--port", str(cli_port)],
                 env={"NTONIX_PORT": str(env_port)})
    wait_http_up(f"http://127.0.0.1:{cli_port}/health", proc)
    status, headers, _ = http("GET", f"http://127.0.0.1:{cli_port}/echo/cli")
    assert status == 200 and headers["x-mock-instance"] == "ep"
    assert refused(env_port) and refused(file_port)


def test_environment_beats_file(tmp_path: Path, backend: MockBackend, started: list[Proc]) -> None:
    file_port, env_port = free_port(), free_port()
    path = write_config(tmp_path, valid(port=file_port, backend="127.0.0.1:9"))
    # NTONIX_CONFIG names the file, NTONIX_BACKENDS replaces its (dead) backend list.
    proc = start(started, [gunicorn_exe(), "-c", "gunicorn.conf.py", "ntonix.wsgi"],
                 env={"NTONIX_CONFIG": str(path), "NTONIX_PORT": str(env_port), "NTONIX_BACKENDS": backend.address})
    wait_http_up(f"http://127.0.0.1:{env_port}/health", proc)
    status, headers, _ = http("GET", f"http://127.0.0.1:{env_port}/echo/env")
    assert status == 200 and headers["x-mock-instance"] == "ep"
    assert refused(file_port)
