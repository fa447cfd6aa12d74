"""Hostile and broken clients, through raw sockets against a live gateway.

- malformed requests → 400 in JSON; headers over the configured sizes → 431; request
  smuggling shapes (Content-Length with Transfer-Encoding, two Content-Lengths, ...) → 400 with
  nothing forwarded;
- hostile bodies (invalid JSON, non-UTF-8, nesting 100,000 deep, 1 GB declared) → 400/413 while
  the worker neither grows nor dies;
- ``X-Request-ID`` with CR/LF, odd bytes or over-long → a fresh id, never echoed;
- a client sending its headers one byte a second is cut off after ``server.keepalive_s``, and
  1,000 of them at once do not keep a normal client waiting;
- ``X-Forwarded-For`` only appended to; ``proxy.trusted_proxies`` decides whose copy is believed
  for ``X-Real-IP`` and the access log;
- ``metrics.allow`` guards ``/metrics`` and ``/cache/stats``; ``/cache/purge`` needs
  ``cache.purge_token``.

Three gateways, each with one worker (so "the worker survives" means something), share one mock
backend: ``gw`` (2 s header timeout, small header limits, a purge token), ``gw_trusted``
(``proxy.trusted_proxies`` = 127.0.0.1) and ``gw_locked`` (``metrics.allow`` = 10.0.0.0/8, no
purge token).
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.live.procs import raw_exchange, wait_until
from tests.live.procs import split_response as split
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration

KEEPALIVE = 2.0
MAX_HEADER_BYTES = 2048
MAX_HEADERS = 32
PURGE_TOKEN = "purge-" + uuid.uuid4().hex
FRESH_ID = re.compile(r"[0-9a-f]{32}")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("h")


@pytest.fixture(scope="module")
def gw(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([mock], config={
        "server": {"keepalive_s": KEEPALIVE, "max_header_bytes": MAX_HEADER_BYTES, "max_headers": MAX_HEADERS},
        "cache": {"purge_token": PURGE_TOKEN},
    })


@pytest.fixture(scope="module")
def gw_trusted(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([mock], config={"proxy": {"trusted_proxies": ["127.0.0.1/32"]}})


@pytest.fixture(scope="module")
def gw_locked(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([mock], config={"metrics": {"allow": ["10.0.0.0/8"]}})


@pytest.fixture
def fresh(mock: MockBackend) -> Iterator[MockBackend]:
    mock.reset()
    yield mock


# ----------------------------------------------------------------------------- helpers








def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(gw: Gateway, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return split(raw_exchange(gw.port, request(method, path, body, headers)))


def json_error(raw: bytes, *expected: int) -> dict[str, Any]:
    """An answer of the gateway's own: one of ``expected``, the OpenAI error shape, a fresh id."""
    status, headers, body = split(raw)
    assert status in expected, raw[:600]
    assert b"<html" not in body.lower()
    assert headers["content-type"].startswith("application/json"), headers
    assert int(headers["content-length"]) == len(body), headers
    err: dict[str, Any] = json.loads(body)["error"]
    assert err["message"] and err["type"] and err["code"] is not None, err
    assert FRESH_ID.fullmatch(headers["x-request-id"]), headers
    return err


def chat(content: str | None = None, **extra: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content or str(uuid.uuid4())}],
                       **extra}).encode()


def worker_pids(master: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == master:
            pids.append(int(entry))
    return sorted(pids)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def still_serves(gw: Gateway) -> None:
    status, _, body = exchange(gw, "GET", "/echo/still-serving")
    assert status == 200, body


def access_line(gw: Gateway, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for line in gw.output().splitlines():
            if request_id in line and '"request.done"' in line:
                found: dict[str, Any] = json.loads(line)
                return found
        return None
    return wait_until(find, timeout=5.0, what=f"the access line of {request_id}")


# ----------------------------------------------------------------------------- malformed requests


MALFORMED = {
    "tls-hello-on-plain-port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
    "no-version": b"GET\r\n\r\n",
    "junk-after-version": b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "bad-method": b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
    "empty-header-name": b"GET / HTTP/1.1\r\n: v\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "negative-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "bad-chunk-size": b"POST /echo/chunk HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_request_is_400_in_json(gw: Gateway, data: bytes) -> None:
    raw = raw_exchange(gw.port, data)
    err = json_error(raw, 400)
    assert err["type"] == "invalid_request_error"
    assert split(raw)[1]["connection"] == "close"
    still_serves(gw)


OVERSIZED = {
    "one-header-over-the-limit": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (MAX_HEADER_BYTES + 1) + b"\r\n\r\n",
    "too-many-headers": b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n",
    # A header section that never ends: refused once it passes the limit, not buffered to the end.
    "endless-header-section": b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: p\r\n" * 100_000,
}


@pytest.mark.parametrize("data", list(OVERSIZED.values()), ids=list(OVERSIZED))
def test_headers_over_the_configured_size_are_431(gw: Gateway, data: bytes) -> None:
    out = raw_exchange(gw.port, data)  # refused before all was sent: the answer is there already
    json_error(out, 431)
    still_serves(gw)


def test_request_line_over_the_limit_is_414(gw: Gateway) -> None:
    json_error(raw_exchange(gw.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"), 414)


# Shapes that two HTTP parsers could read differently (request smuggling): each must be refused
# outright, and nothing of it (nor of the request hidden in its body) may reach a backend.
SMUGGLED = b"GET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLING = {
    "cl-then-te": b"POST /echo/s1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\r\n" % (5 + len(SMUGGLED)) + SMUGGLED,
    "te-then-cl": b"POST /echo/s2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
                  b"5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    "two-lengths": b"POST /echo/s3 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: %d\r\n\r\n"
                   % len(SMUGGLED) + SMUGGLED,
    "same-length-twice": b"POST /echo/s4 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "length-list": b"POST /echo/s5 HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    "length-plus-sign": b"POST /echo/s6 HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "te-chunked-twice": b"POST /echo/s7 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": b"POST /echo/s8 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n"
                             b"Content-Length: 5\r\n\r\n0\r\n\r\n",
    "te-in-http-1.0": b"POST /echo/s9 HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-unknown": b"POST /echo/s10 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "chunk-ext-bare-lf": b"POST /echo/s11 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5;a\nb\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    # gunicorn takes the chunking off and the header is hop-by-hop: the backend would get
    # gzip bytes with nothing saying so.
    "te-gzip-chunked": b"POST /echo/s12 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                       b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("data", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_ambiguous_framing_is_refused_and_nothing_is_forwarded(gw: Gateway, fresh: MockBackend, data: bytes) -> None:
    raw = raw_exchange(gw.port, data)
    # 501 for a transfer coding we do not know (RFC 9112 §6.1), else 400.
    json_error(raw, 400, 501)
    assert raw.count(b"HTTP/1.") == 1, f"one answer only, nothing for a hidden request: {raw!r}"
    status, _, _ = split(raw)
    assert raw.startswith(b"HTTP/1.1 %d %s" % (status, {400: b"Bad Request", 501: b"Not Implemented"}[status]))
    still_serves(gw)
    assert fresh.stats()["by_path"] == {"/echo/still-serving": 1}, "nothing of it may reach a backend"


@pytest.mark.parametrize(("framing", "said"), [
    (b"Content-Length: 10\r\n\r\n{\"a\": ", "6 of its 10 bytes"),  # {"a": plus a space
    (b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\"", "before its last chunk"),  # inside a chunk
    (b"Transfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n", "before its last chunk"),  # no last chunk
    (b"Transfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n0\r\n", "before its last chunk"),  # no empty line
    (b"Transfer-Encoding: chunked\r\n\r\n3;\x01\r\n{\"a\r\n0\r\n\r\n", "malformed chunked"),  # extension
], ids=["content-length", "chunked-inside", "chunked-no-end", "chunked-no-empty-line", "chunked-bad-extension"])
def test_a_body_cut_short_is_400_and_not_forwarded(gw: Gateway, fresh: MockBackend, framing: bytes, said: str) -> None:
    """The client sends part of its body, then ends its side of the connection (a chunked one
    got no answer at all: gunicorn's end-of-data error is an OSError)."""
    for path in ("/echo/short", "/v1/chat/completions"):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % path.encode() + framing)
            s.shutdown(socket.SHUT_WR)
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        err = json_error(raw, 400)
        assert said in err["message"], err
        assert raw.count(b"HTTP/1.") == 1
    still_serves(gw)
    assert fresh.stats()["by_path"] == {"/echo/still-serving": 1}, "a cut body reached a backend"


# ----------------------------------------------------------------------------- hostile bodies


def _hostile_bodies() -> list[tuple[str, bytes, int]]:
    deep = 100_000
    return [
        ("invalid-json", b'{"model": "m", "messages": [', 400),
        ("not-utf-8", b'{"model": "\xff\xfe\xfa", "messages": []}', 400),
        ("lone-surrogate", b'{"model": "\\ud800", "messages": []}', 400),
        ("nested-arrays", b"[" * deep + b"]" * deep, 400),
        ("nested-objects", b'{"a":' * deep + b"1" + b"}" * deep, 400),
        ("nested-in-a-field", b'{"model": "m", "messages": ' + b"[" * deep + b"]" * deep + b"}", 400),
    ]


def _send_hostile_round(gw: Gateway) -> None:
    for name, body, expected in _hostile_bodies():
        raw = raw_exchange(gw.port, request("POST", "/v1/chat/completions", body,
                                            {"Content-Type": "application/json"}))
        err = json_error(raw, expected)
        assert "JSON" in err["message"] or "nested" in err["message"], (name, err)
    # 1 GB declared, a few bytes sent: refused at once, the rest never read.
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n")
    started = time.monotonic()
    err = json_error(raw_exchange(gw.port, head + b'{"model": "m", "messages": [' + b" " * 4000), 413)
    assert time.monotonic() - started < 2.0
    assert "1073741824" in err["message"], err


def test_hostile_bodies_are_refused_without_the_worker_growing_or_dying(gw: Gateway, fresh: MockBackend) -> None:
    workers = worker_pids(gw.pid)
    assert len(workers) == 1, workers
    _send_hostile_round(gw)  # warm-up: first-time allocations are not growth
    before = rss_kib(workers[0])
    for _ in range(10):
        _send_hostile_round(gw)
    after = rss_kib(workers[0])
    assert worker_pids(gw.pid) == workers, "the worker died and was replaced"
    assert after - before < 8 * 1024, f"worker RSS grew {before} → {after} KiB over 70 hostile requests"
    assert fresh.stats()["requests"] == 0, "a refused request reached the backend"
    still_serves(gw)


def test_chunked_body_over_the_limit_is_413_without_reading_it_all(gateway: GatewayFactory,
                                                                   mock: MockBackend) -> None:
    gw = gateway([mock], config={"proxy": {"max_body_bytes": 64 * 1024}})
    piece = b"x" * 16384
    chunk = b"%x\r\n%b\r\n" % (len(piece), piece)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /echo/big HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        out = b""
        try:
            while sent < 64 * 1024 * 1024:  # would be 64 MB: the gateway stops us long before
                s.sendall(chunk)
                sent += len(piece)
                if sent > 1024 * 1024:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while data := s.recv(65536):
                out += data
        except ConnectionResetError:
            pass
    json_error(out, 413)


# ----------------------------------------------------------------------------- X-Request-ID


@pytest.mark.parametrize("value", [
    "a" * 129, "x" * 2000, "ab\xe9cd", "ab cd", "<script>", "id;rm -rf", "-leading-dash", "\x85next-line",
], ids=["129-chars", "2000-chars", "latin-1", "space", "markup", "semicolon", "leading-dash", "nel"])
def test_insane_request_id_is_replaced_never_echoed(gw: Gateway, value: str) -> None:
    raw = raw_exchange(gw.port, request("GET", "/echo/rid", headers={"X-Request-ID": value}))
    status, headers, body = split(raw)
    assert status == 200
    rid = headers["x-request-id"]
    assert FRESH_ID.fullmatch(rid), rid
    seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert seen["x-request-id"] == rid, "the backend gets the same fresh id"
    assert value.encode("latin-1") not in raw


@pytest.mark.parametrize("data", [
    b"GET /echo/rid HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc\rSet-Cookie: evil=1\r\n\r\n",
    b"GET /echo/rid HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc\r\n Set-Cookie: evil=1\r\n\r\n",
    b"GET /echo/rid HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc\x00Set-Cookie: evil=1\r\n\r\n",
], ids=["bare-cr", "folded-crlf", "nul"])
def test_request_id_with_cr_lf_is_refused_and_not_echoed(gw: Gateway, data: bytes) -> None:
    raw = raw_exchange(gw.port, data)
    json_error(raw, 400)
    assert b"Set-Cookie" not in raw and b"evil" not in raw.split(b"\r\n\r\n")[0]
    assert b"abc" not in raw.split(b"\r\n\r\n")[0]


def test_sane_request_id_is_kept(gw: Gateway) -> None:
    rid = f"client-{uuid.uuid4()}"
    status, headers, _ = exchange(gw, "GET", "/echo/rid", headers={"X-Request-ID": rid})
    assert status == 200 and headers["x-request-id"] == rid


# ----------------------------------------------------------------------------- slow clients


def test_client_sending_headers_one_byte_a_second_is_cut_off(gw: Gateway) -> None:
    data = b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"p" * 60
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        started = time.monotonic()
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ)
        closed_after: float | None = None
        sent = 0
        try:
            while time.monotonic() - started < KEEPALIVE + 6:
                if time.monotonic() - started >= sent and sent < len(data):
                    s.send(data[sent:sent + 1])
                    sent += 1
                if sel.select(timeout=0.05) and not s.recv(65536):
                    closed_after = time.monotonic() - started
                    break
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - started
        sel.close()
    assert closed_after is not None, "the slow client was never cut off"
    assert KEEPALIVE - 0.25 <= closed_after <= KEEPALIVE + 1.0, closed_after


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"cannot open {wanted} files (RLIMIT_NOFILE hard limit {hard})")


def test_a_thousand_slow_clients_do_not_keep_a_normal_one_waiting(gw: Gateway) -> None:
    n = 1000
    _raise_fd_limit(n + 512)
    sel = selectors.DefaultSelector()
    slow: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", gw.port))
            slow.append(s)
            sel.register(s, selectors.EVENT_WRITE)
        pending, deadline = set(slow), time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                sel.unregister(sock)
                pending.discard(sock)
        assert not pending, f"{len(pending)} slow connections never connected"
        started = time.monotonic()
        data = b"GET /health HTTP/1.1\r\nHost: gw\r\n"

        def trickle(i: int) -> None:
            for s in slow:
                try:
                    s.send(data[i:i + 1])
                except OSError:
                    pass

        trickle(0)
        latencies = []
        sent = 1
        while time.monotonic() - started < KEEPALIVE - 0.4:
            if time.monotonic() - started >= sent:
                trickle(sent)
                sent += 1
            t0 = time.monotonic()
            status, _, _ = split(raw_exchange(gw.port, request("GET", "/echo/normal"), timeout=5))
            latencies.append(time.monotonic() - t0)
            assert status == 200
            time.sleep(0.1)
        assert latencies and max(latencies) < 1.0, latencies

        # ... and all of them are cut off at the header timeout.
        for s in slow:
            sel.register(s, selectors.EVENT_READ)
        open_ = set(slow)
        deadline = started + KEEPALIVE + 5
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    gone = not sock.recv(4096)
                except OSError:
                    gone = True
                if gone:
                    sel.unregister(sock)
                    open_.discard(sock)
        assert not open_, f"{len(open_)} of {n} slow connections were still open {KEEPALIVE + 5}s later"
    finally:
        sel.close()
        for s in slow:
            s.close()
    still_serves(gw)


# ----------------------------------------------------------------------------- X-Forwarded-For, X-Real-IP


def echo_headers(gw: Gateway, headers: dict[str, str] | list[tuple[str, str]]) -> tuple[dict[str, str], str]:
    """What the backend saw (lower-case names) and the request id."""
    pairs = headers.items() if isinstance(headers, dict) else headers
    head = "GET /echo/xff HTTP/1.1\r\nHost: gw\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs)
    raw = raw_exchange(gw.port, (head + "Connection: close\r\n\r\n").encode())
    status, resp_headers, body = split(raw)
    assert status == 200, raw
    return {k.lower(): v for k, v in json.loads(body)["headers"].items()}, resp_headers["x-request-id"]


def test_forwarded_for_is_only_appended_to_and_not_believed_by_default(gw: Gateway) -> None:
    seen, rid = echo_headers(gw, {"X-Forwarded-For": "203.0.113.7, 198.51.100.2", "X-Real-IP": "203.0.113.99"})
    assert seen["x-forwarded-for"] == "203.0.113.7, 198.51.100.2, 127.0.0.1"
    assert seen["x-real-ip"] == "127.0.0.1", "an untrusted peer's X-Forwarded-For is not believed"
    assert access_line(gw, rid)["client"] == "127.0.0.1"
    # Two header lines: both kept, in order, then the peer.
    seen, _ = echo_headers(gw, [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.2")])
    parts = [p.strip() for p in seen["x-forwarded-for"].split(",")]
    assert parts == ["203.0.113.7", "198.51.100.2", "127.0.0.1"], seen["x-forwarded-for"]
    # A look-alike name with underscores is not taken for the real header.
    seen, _ = echo_headers(gw, {"X_Forwarded_For": "6.6.6.6"})
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert "6.6.6.6" not in json.dumps(seen)


def test_trusted_proxy_forwarded_for_decides_the_real_ip(gw_trusted: Gateway) -> None:
    seen, rid = echo_headers(gw_trusted, {"X-Forwarded-For": "203.0.113.7"})
    assert seen["x-real-ip"] == "203.0.113.7"
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert access_line(gw_trusted, rid)["client"] == "203.0.113.7"
    # The nearest untrusted address counts: whatever the client put further left is its own claim.
    seen, rid = echo_headers(gw_trusted, {"X-Forwarded-For": "10.9.9.9, 198.51.100.2"})
    assert seen["x-real-ip"] == "198.51.100.2"
    assert access_line(gw_trusted, rid)["client"] == "198.51.100.2"
    seen, _ = echo_headers(gw_trusted, {})
    assert seen["x-real-ip"] == "127.0.0.1"
    assert seen["x-forwarded-for"] == "127.0.0.1"


def test_absolute_form_target_reaches_the_backend_in_origin_form(gateway: GatewayFactory) -> None:
    """``GET http://other.host/x``: the backend must not be told another host (RFC 9112 §3.2)."""
    lines: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        # Answer everything, note the request lines.
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                buf = b""
                try:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            break
                        buf += data
                    lines.append(buf.split(b"\r\n", 1)[0])
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        gw = gateway([f"127.0.0.1:{server.getsockname()[1]}"], config={"health": {"enabled": False}})
        raw = raw_exchange(gw.port, b"GET http://evil.example/echo/abs?q=1 HTTP/1.1\r\nHost: gw\r\n"
                                    b"Connection: close\r\n\r\n")
        assert split(raw)[0] == 200, raw
        proxied = [line for line in lines if b"abs" in line]
        assert proxied == [b"GET /echo/abs?q=1 HTTP/1.1"], lines
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


# ----------------------------------------------------------------------------- own endpoints


@pytest.mark.parametrize("path", ["/metrics", "/metrics?format=prometheus", "/cache/stats"])
def test_metrics_and_cache_stats_are_limited_to_the_allowed_networks(gw_locked: Gateway, path: str) -> None:
    err = json_error(raw_exchange(gw_locked.port, request("GET", path)), 403)
    assert err["type"] == "permission_error"
    # Claiming to come from an allowed network does not help.
    json_error(raw_exchange(gw_locked.port, request("GET", path, headers={"X-Forwarded-For": "10.1.2.3",
                                                                          "X-Real-IP": "10.1.2.3"})), 403)


def test_health_and_proxying_stay_open_when_metrics_are_limited(gw_locked: Gateway) -> None:
    status, _, body = exchange(gw_locked, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, _ = exchange(gw_locked, "GET", "/echo/open")
    assert status == 200


def test_metrics_are_open_without_an_allow_list(gw: Gateway) -> None:
    for path in ("/metrics", "/cache/stats"):
        status, _, _ = exchange(gw, "GET", path)
        assert status == 200


@pytest.mark.parametrize("auth", [None, "Bearer ", "Bearer anything", f"Bearer {PURGE_TOKEN}"])
def test_purge_is_refused_when_no_token_is_configured(gw_locked: Gateway, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    err = json_error(raw_exchange(gw_locked.port, request("POST", "/cache/purge", headers=headers)), 403)
    assert "purge_token" in err["message"], err


def test_purge_needs_the_right_token_and_empties_the_cache(gw: Gateway, fresh: MockBackend) -> None:
    body = chat()
    hdrs = {"Content-Type": "application/json"}
    assert exchange(gw, "POST", "/v1/chat/completions", body, hdrs)[1]["x-cache"] == "MISS"
    assert exchange(gw, "POST", "/v1/chat/completions", body, hdrs)[1]["x-cache"] == "HIT"
    assert gw.cache_stats()["entries"] >= 1
    for auth in (None, "Bearer wrong", f"Bearer {PURGE_TOKEN}x", PURGE_TOKEN[:-1], "Basic " + PURGE_TOKEN):
        headers = {"Authorization": auth} if auth is not None else {}
        json_error(raw_exchange(gw.port, request("POST", "/cache/purge", headers=headers)), 403)
    # Refused purges purge nothing.
    assert exchange(gw, "POST", "/v1/chat/completions", body, hdrs)[1]["x-cache"] == "HIT"
    status, _, answer = exchange(gw, "POST", "/cache/purge", headers={"Authorization": f"Bearer {PURGE_TOKEN}"})
    assert status == 200, answer
    assert json.loads(answer)["purged"] >= 1
    assert gw.cache_stats()["entries"] == 0
    assert exchange(gw, "POST", "/v1/chat/completions", body, hdrs)[1]["x-cache"] == "MISS"


def test_a_body_that_never_arrives_is_cut_off_with_408(mock_backend: Any, gateway: Any) -> None:
    backend = mock_backend("body-timeout")
    gw = gateway([backend], config={"server": {"body_timeout_s": 1}})
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\":")
        data = b""
        while True:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"request_timeout"' in data
    assert 0.8 <= elapsed < 4.0, elapsed
    assert gw.request("GET", "/health")[0] == 200
