"""Live TLS tests: HTTPS beside HTTP in one gateway, with real clients.

Python's ssl module with pinned protocol versions, ``openssl s_client`` and the openai client
talk to a gateway whose certificates come from a trustme CA. One gateway (``a.test`` and
``*.b.test`` SNI entries, a 1 s handshake timeout) and one mock backend serve the module; the
start-up and HUP tests start their own.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import trustme
from cryptography import x509

from tests.live.procs import wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory, write_cert

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
HANDSHAKE_TIMEOUT_S = 1.0
DEFAULT_SAN = ["localhost"]  # what tests.live.servers.Gateway issues for server.crt (plus IP SANs)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def backend(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("tls1")


@pytest.fixture(scope="module")
def gw(gateway_module: GatewayFactory, backend: MockBackend, ca: trustme.CA,
       tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    folder = tmp_path_factory.mktemp("sni")
    a_crt, a_key = write_cert(ca, folder, "a", "a.test")
    w_crt, w_key = write_cert(ca, folder, "wild", "*.b.test")
    return gateway_module([backend], ssl=True, ca=ca, config={"ssl": {
        "handshake_timeout_s": HANDSHAKE_TIMEOUT_S,
        "sni": {"a.test": {"cert_file": str(a_crt), "key_file": str(a_key)},
                "*.b.test": {"cert_file": str(w_crt), "key_file": str(w_key)}},
    }})


# ----------------------------------------------------------------------------- clients


def client_context(ca: trustme.CA | None = None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """Trusts ``ca`` (or nothing is verified); ``version`` pins min = max."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the tests look at the certificate themselves
    if ca is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ca.configure_trust(ctx)
    if version is not None:
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ctx.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL 3 will not even offer them
    return ctx


def tls_get(port: int, ctx: ssl.SSLContext, path: str = "/health", server_name: str | None = "localhost",
            headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[str | None, int, bytes]:
    """One ``GET`` over a fresh TLS connection; (protocol version, status, body)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        version = tls.version()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return version, int(head.split()[1]), body


def https_ok(gw: Gateway, ca: trustme.CA) -> float:
    """A full HTTPS request on a fresh connection succeeds; returns how long it took."""
    started = time.monotonic()
    _, status, body = tls_get(gw.ssl_port or 0, client_context(ca))
    assert status == 200, body
    return time.monotonic() - started


def peer_dns_names(gw: Gateway, ca: trustme.CA, server_name: str | None) -> list[str]:
    with socket.create_connection((LOOPBACK, gw.ssl_port or 0), timeout=5) as raw, \
            client_context(ca).wrap_socket(raw, server_hostname=server_name) as tls:
        cert = tls.getpeercert()
    assert cert
    sans = cast("tuple[tuple[str, str], ...]", cert["subjectAltName"])
    return [value for kind, value in sans if kind == "DNS"]


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``openssl s_client -connect 127.0.0.1:PORT ARGS`` with stdin at EOF (it hangs up at once)."""
    return subprocess.run(["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", *args],
                          input=b"", capture_output=True, timeout=15, check=False)


def s_client_dns_names(out: bytes) -> list[str]:
    pem = re.search(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", out, re.S)
    assert pem, out[-2000:]
    cert = x509.load_pem_x509_certificate(pem.group(0))
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (made in memory)."""
    out = ssl.MemoryBIO()
    obj = client_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def handshake_failures(gw: Gateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.output().splitlines() if '"tls.handshake_failed"' in line]


def new_failures(gw: Gateway, before: int, count: int) -> list[dict[str, Any]]:
    """Wait until ``count`` handshake failures were logged after the first ``before``; return them."""
    wait_until(lambda: len(handshake_failures(gw)) >= before + count, timeout=5,
               what=f"{count} tls.handshake_failed lines")
    return handshake_failures(gw)[before:]


def no_tracebacks(gw: Gateway) -> None:
    out = gw.output()
    assert "Traceback" not in out, out[-3000:]


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as ex:
        yield ex


# ----------------------------------------------------------------------------- protocol versions


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls12_and_tls13_handshakes_succeed(gw: Gateway, ca: trustme.CA, version: ssl.TLSVersion) -> None:
    got, status, body = tls_get(gw.ssl_port or 0, client_context(ca, version))
    assert status == 200, body
    assert got == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls10_and_tls11_refused_python(gw: Gateway, ca: trustme.CA, version: ssl.TLSVersion) -> None:
    before = len(handshake_failures(gw))
    with pytest.raises(ssl.SSLError) as info:
        tls_get(gw.ssl_port or 0, client_context(ca, version))
    assert info.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"  # the server's alert, not our refusal
    https_ok(gw, ca)
    failures = new_failures(gw, before, 1)
    assert failures[0]["reason"] == "UNSUPPORTED_PROTOCOL"


@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
def test_tls10_and_tls11_refused_openssl(gw: Gateway, ca: trustme.CA, flag: str) -> None:
    result = s_client(gw.ssl_port or 0, flag, "-cipher", "DEFAULT@SECLEVEL=0", "-servername", "localhost")
    assert result.returncode != 0
    assert b"alert protocol version" in result.stderr, result.stderr  # offered, and refused by the server
    assert b"BEGIN CERTIFICATE" not in result.stdout
    https_ok(gw, ca)


def test_tls12_openssl_control(gw: Gateway) -> None:
    # The same command with TLS 1.2 connects: the failures above are about the version only.
    result = s_client(gw.ssl_port or 0, "-tls1_2", "-servername", "localhost")
    assert result.returncode == 0, result.stderr
    assert b"Protocol  : TLSv1.2" in result.stdout


# ----------------------------------------------------------------------------- SNI


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [("a.test", ["a.test"]), ("x.b.test", ["*.b.test"]), ("other.test", DEFAULT_SAN),
     ("y.x.b.test", DEFAULT_SAN), ("b.test", DEFAULT_SAN)],
)
def test_sni_openssl_s_client(gw: Gateway, server_name: str, expected: list[str]) -> None:
    result = s_client(gw.ssl_port or 0, "-servername", server_name)
    assert result.returncode == 0, result.stderr
    assert s_client_dns_names(result.stdout) == expected


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [("a.test", ["a.test"]), ("A.TEST", ["a.test"]), ("x.b.test", ["*.b.test"]), ("other.test", DEFAULT_SAN),
     (None, DEFAULT_SAN)],
)
def test_sni_python_client(gw: Gateway, ca: trustme.CA, server_name: str | None, expected: list[str]) -> None:
    assert peer_dns_names(gw, ca, server_name) == expected


def test_sni_certificate_verifies_for_its_name(gw: Gateway, ca: trustme.CA) -> None:
    # Full verification, hostname included, as a real client would do it.
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    for name in ("a.test", "x.b.test", "localhost"):
        _, status, _ = tls_get(gw.ssl_port or 0, ctx, server_name=name)
        assert status == 200


# ----------------------------------------------------------------------------- failed handshakes


def test_plain_http_on_the_tls_port_fails_cleanly(gw: Gateway, ca: trustme.CA,
                                                 pool: concurrent.futures.ThreadPoolExecutor) -> None:
    before = len(handshake_failures(gw))

    def plain() -> bytes:
        with socket.create_connection((LOOPBACK, gw.ssl_port or 0), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            try:
                return s.recv(65536)
            except ConnectionResetError:
                return b""

    plains = [pool.submit(plain) for _ in range(4)]
    goods = [pool.submit(https_ok, gw, ca) for _ in range(4)]
    for answer in [p.result(timeout=5) for p in plains]:
        assert not answer.startswith(b"HTTP/"), answer  # never an HTTP answer in clear text
    for took in [g.result(timeout=5) for g in goods]:
        assert took < 2.0
    failures = new_failures(gw, before, 4)
    assert {f["reason"] for f in failures} == {"HTTP_REQUEST"}
    assert all(f["client"] == LOOPBACK for f in failures)
    no_tracebacks(gw)


def test_tls_on_the_plain_port_fails_cleanly(gw: Gateway, ca: trustme.CA) -> None:
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        tls_get(gw.port, client_context(ca))
    status, _, _ = gw.request("GET", "/health")
    assert status == 200
    https_ok(gw, ca)


def test_half_a_client_hello_then_hang_up(gw: Gateway, ca: trustme.CA,
                                          pool: concurrent.futures.ThreadPoolExecutor) -> None:
    hello = client_hello()
    before = len(handshake_failures(gw))
    held = socket.create_connection((LOOPBACK, gw.ssl_port or 0), timeout=5)  # half a hello, kept open
    held.sendall(hello[: len(hello) // 2])
    try:
        for _ in range(3):
            with socket.create_connection((LOOPBACK, gw.ssl_port or 0), timeout=5) as s:
                s.sendall(hello[: len(hello) // 2])
        goods = [pool.submit(https_ok, gw, ca) for _ in range(4)]
        for fut in goods:
            assert fut.result(timeout=5) < 0.8  # not waiting for the half-open handshakes (1 s)
    finally:
        held.close()
    failures = new_failures(gw, before, 4)
    assert len(failures) == 4
    no_tracebacks(gw)


def test_silent_client_dropped_after_handshake_timeout(gw: Gateway, ca: trustme.CA,
                                                       pool: concurrent.futures.ThreadPoolExecutor) -> None:
    before = len(handshake_failures(gw))

    def silent() -> float:
        with socket.create_connection((LOOPBACK, gw.ssl_port or 0), timeout=HANDSHAKE_TIMEOUT_S + 5) as s:
            started = time.monotonic()
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            return time.monotonic() - started

    silents = [pool.submit(silent) for _ in range(3)]
    time.sleep(0.2)
    assert https_ok(gw, ca) < 0.8  # served while the silent ones wait (1 s)
    for fut in silents:
        closed_after = fut.result(timeout=HANDSHAKE_TIMEOUT_S + 6)
        assert HANDSHAKE_TIMEOUT_S - 0.3 < closed_after < HANDSHAKE_TIMEOUT_S + 1.0, closed_after
    failures = new_failures(gw, before, 3)
    assert {f["reason"] for f in failures} == {f"no handshake within {HANDSHAKE_TIMEOUT_S:g}s"}
    https_ok(gw, ca)


def test_one_log_line_per_failed_handshake(gw: Gateway) -> None:
    # Runs after the tests above in file order; also fine alone (then there is nothing to check).
    out = gw.output().splitlines()
    for i, line in enumerate(out):
        if '"tls.handshake_failed"' in line:
            assert line.startswith("{") and json.loads(line)["level"] == "info"
            assert i + 1 == len(out) or out[i + 1].startswith("{"), out[i:i + 3]  # nothing spilled after it


# ----------------------------------------------------------------------------- traffic over HTTPS


def test_stream_over_https_arrives_event_by_event(gw: Gateway, ca: trustme.CA) -> None:
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "tls stream"}]})
    with socket.create_connection((LOOPBACK, gw.ssl_port or 0), timeout=10) as raw, \
            client_context(ca).wrap_socket(raw, server_hostname="localhost") as tls:
        started = time.monotonic()
        tls.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     f"Cache-Control: no-store\r\nX-Mock-Token-Delay: 0.2\r\nX-Mock-Tokens: 8\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}").encode())
        buf, arrivals = b"", list[float]()
        while chunk := tls.recv(65536):
            buf += chunk
            arrivals.extend([time.monotonic() - started] * (buf.count(b"data: ") - len(arrivals)))
    head, _, _ = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"text/event-stream" in head.lower()
    assert buf.count(b"data: ") == 9 and b"data: [DONE]" in buf  # 8 tokens + [DONE]
    assert len(arrivals) == 9
    assert arrivals[-1] - arrivals[0] > 1.0, arrivals  # 7 gaps of 0.2 s, not one burst at the end
    assert arrivals[0] < 0.5, arrivals
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:-1])]  # between the 8 tokens
    assert sum(1 for gap in gaps if gap > 0.1) >= 6, arrivals


def test_x_forwarded_proto(gw: Gateway, ca: trustme.CA) -> None:
    _, status, body = tls_get(gw.ssl_port or 0, client_context(ca), path="/echo",
                              headers={"X-Forwarded-Proto": "http"})  # a client's claim is not believed
    assert status == 200
    assert json.loads(body)["headers"]["X-Forwarded-Proto"] == "https"
    status, _, body = gw.request("GET", "/echo", headers={"X-Forwarded-Proto": "https"})
    assert status == 200
    assert json.loads(body)["headers"]["X-Forwarded-Proto"] == "http"


def test_http_port_serves_alongside(gw: Gateway, ca: trustme.CA,
                                    pool: concurrent.futures.ThreadPoolExecutor) -> None:
    def plain() -> int:
        return gw.request("GET", "/echo/plain")[0]

    def secure() -> int:
        return gw.request("GET", "/echo/secure", https=True)[0]

    futures = [pool.submit(fn) for _ in range(6) for fn in (plain, secure)]
    assert [f.result(timeout=10) for f in futures] == [200] * 12


def test_openai_client_over_https(gw: Gateway) -> None:
    import openai

    assert gw.ca_path is not None
    # openai 3.x ships httpx2: DefaultHttpxClient subclasses httpx2.Client, whose verify=<path>
    # is deprecated (a warning, an error here), so it gets an SSLContext.
    http_client = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(gw.ca_path)))
    with openai.OpenAI(base_url=f"{gw.https_url}/v1", api_key="x", http_client=http_client, max_retries=0) as oa:
        reply = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello tls"}],
                                           max_tokens=3)
        assert reply.choices[0].message.content and reply.choices[0].message.content.endswith("tok0 tok1 tok2")
        stream = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "stream tls"}],
                                            max_tokens=4, stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) == 4 and pieces[-1] == " tok3"


# ----------------------------------------------------------------------------- start-up and reload


def _start_fails(gateway: GatewayFactory, config: dict[str, Any], ca: trustme.CA) -> str:
    gw = gateway(ssl=True, ca=ca, config=config, backends=["127.0.0.1:9"], wait=False)
    assert gw.proc.wait(timeout=20) == 2
    return gw.output()


def test_bad_certificate_path_stops_start_up(gateway: GatewayFactory, tls_ca: trustme.CA) -> None:
    out = _start_fails(gateway, {"ssl": {"cert_file": "missing.crt"}}, tls_ca)
    assert len(out.splitlines()) == 1, out  # stdout and stderr together: one line, no traceback
    assert out.startswith("ntonix: invalid configuration: ssl.cert_file: file not found: ")
    assert "missing.crt (" in out and "gen_dev_cert.py" in out  # the path, then what to do about it


def test_mismatched_pair_stops_start_up(gateway: GatewayFactory, tls_ca: trustme.CA, tmp_path: Path) -> None:
    _, other_key = write_cert(tls_ca, tmp_path, "other", "other.test")
    out = _start_fails(gateway, {"ssl": {"key_file": str(other_key)}}, tls_ca)
    assert len(out.splitlines()) == 1, out
    assert out.startswith("ntonix: invalid configuration: ssl.key_file: does not match the certificate in "
                          "ssl.cert_file "), out
    assert str(other_key) in out


def test_bad_sni_entry_stops_start_up(gateway: GatewayFactory, tls_ca: trustme.CA, tmp_path: Path) -> None:
    crt, _ = write_cert(tls_ca, tmp_path, "a", "a.test")
    junk = tmp_path / "junk.key"
    junk.write_text("junk\n")
    out = _start_fails(gateway, {"ssl": {"sni": {"a.test": {"cert_file": str(crt), "key_file": str(junk)}}}},
                       tls_ca)
    assert len(out.splitlines()) == 1, out
    assert out.startswith("ntonix: invalid configuration: ssl.sni['a.test'].key_file: no PEM private key in "), out


def test_certificates_reread_on_hup(gateway: GatewayFactory, mock_backend: MockBackendFactory,
                                    tls_ca: trustme.CA, tmp_path: Path) -> None:
    gw = gateway([mock_backend("hup1")], ssl=True, ca=tls_ca, workers=2)
    assert peer_dns_names(gw, tls_ca, "localhost") == DEFAULT_SAN

    # A broken pair on HUP is refused by the master; the old certificate keeps serving.
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(gw.folder / name, saved / name)
    write_cert(tls_ca, tmp_path, "stray", "stray.test")
    shutil.copy(tmp_path / "stray.key", gw.folder / "server.key")
    gw.reload()
    wait_until(lambda: "config.reload_rejected" in gw.output(), timeout=10, what="the HUP rejected")
    assert "ssl.key_file: does not match" in gw.output()
    assert peer_dns_names(gw, tls_ca, "localhost") == DEFAULT_SAN

    # A good new pair (another name): new connections get it, from every worker.
    write_cert(tls_ca, gw.folder, "server", "reloaded.test")
    gw.reload()

    def all_new() -> bool:
        return all(peer_dns_names(gw, tls_ca, "localhost") == ["reloaded.test"] for _ in range(10))

    wait_until(all_new, timeout=10, what="the new certificate on every connection")
    status, _, _ = gw.request("GET", "/health", https=False)
    assert status == 200
    no_tracebacks(gw)


def _worker_pids(gw: Gateway) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{gw.pid}/task/{gw.pid}/children").read_text().split()]


def test_worker_booting_while_files_are_broken(gateway: GatewayFactory, mock_backend: MockBackendFactory,
                                               tls_ca: trustme.CA, tmp_path: Path) -> None:
    # The files on disk changed after the master checked them and no HUP came yet; then a worker
    # is (re)spawned. It must neither crash in a respawn loop nor serve a half-loaded TLS port:
    # it serves HTTP, leaves TLS connections to other workers, and takes TLS up on the next HUP.
    gw = gateway([mock_backend("boot1")], ssl=True, ca=tls_ca, workers=1)
    write_cert(tls_ca, tmp_path, "stray", "stray.test")
    shutil.copy(tmp_path / "stray.key", gw.folder / "server.key")  # mismatched now
    [old] = _worker_pids(gw)
    os.kill(old, signal.SIGKILL)  # a child of the gateway this test started, by its PID
    wait_until(lambda: (pids := _worker_pids(gw)) and pids != [old], timeout=10, what="a new worker")
    wait_until(lambda: "tls.context_failed" in gw.output(), timeout=10, what="tls.context_failed logged")
    assert gw.request("GET", "/health")[0] == 200
    with pytest.raises((TimeoutError, socket.timeout)):  # nobody accepts on the TLS port
        tls_get(gw.ssl_port or 0, client_context(tls_ca), timeout=1.0)
    [worker] = _worker_pids(gw)

    write_cert(tls_ca, gw.folder, "server", "fixed.test")
    gw.reload()
    wait_until(lambda: peer_dns_names(gw, tls_ca, "localhost") == ["fixed.test"], timeout=10,
               what="TLS served after the HUP")
    assert _worker_pids(gw) == [worker]  # the same worker: no crash, no respawn loop
    assert gw.output().count("tls.context_failed") == 1
    no_tracebacks(gw)
