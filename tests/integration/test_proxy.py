"""Forwarding through a live gateway: methods, paths, bodies, headers, request ids, weights.

One gateway (two workers) in front of two mock backends weighted 1:3 serves the whole module.
``/echo`` on the mock answers with the request exactly as it arrived there, so each test can
compare what the client sent with what the backend received. ``/echo`` is not cacheable.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from typing import Any

import pytest

from tests.live.procs import client_exchange, split_response
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration

FRESH_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def backends(mock_backend_module: MockBackendFactory) -> tuple[MockBackend, MockBackend]:
    return mock_backend_module("a"), mock_backend_module("b")


@pytest.fixture(scope="module")
def gw(backends: tuple[MockBackend, MockBackend], gateway_module: GatewayFactory) -> Gateway:
    # Backends first, so they are stopped after the gateway: a mock stopped while the gateway
    # still holds keep-alive connections to it waits its whole graceful timeout.
    a, b = backends
    return gateway_module([a, (b, 3)], workers=2)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def exchange(gw: Gateway, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with http.client: exactly the headers given (plus Host, Content-Length)."""
    return client_exchange(gw.port, method, path, body, headers)


def raw_exchange(port: int, data: bytes | list[bytes], timeout: float = 10.0) -> bytes:
    """Send raw bytes (pieces sent one by one) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        for piece in [data] if isinstance(data, bytes) else data:
            s.sendall(piece)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out





# ----------------------------------------------------------------------------- methods, paths, bodies


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_any_method_path_query_and_body(gw: Gateway, method: str) -> None:
    body = f"payload for {method} \u00e9".encode()
    status, headers, raw = exchange(gw, method, "/echo/some/deep/path.json?x=1&y=a%20b&x=2", body,
                                    {"Content-Type": "text/plain; charset=utf-8"})
    assert status == 200, raw
    echo = json.loads(raw)
    assert echo["method"] == method
    assert echo["path"] == "/echo/some/deep/path.json"
    assert echo["query"] == "x=1&y=a%20b&x=2"
    assert echo["body"] == body.decode()
    assert echo["body_len"] == len(body)
    assert lower(echo["headers"])["content-type"] == "text/plain; charset=utf-8"
    assert headers["x-mock-instance"] in ("a", "b")


def test_head(gw: Gateway) -> None:
    status, headers, raw = exchange(gw, "HEAD", "/echo/head")
    assert status == 200
    assert raw == b""
    assert headers["x-mock-instance"] in ("a", "b")
    assert FRESH_ID.fullmatch(headers["x-request-id"])


def test_get_without_body_sends_none(gw: Gateway) -> None:
    status, _, raw = exchange(gw, "GET", "/echo/nobody")
    echo = json.loads(raw)
    assert status == 200
    assert echo["body_len"] == 0
    assert "transfer-encoding" not in lower(echo["headers"])


def test_large_body_arrives_whole(gw: Gateway) -> None:
    body = hashlib.sha256(b"seed").hexdigest().encode() * (2 * 1024 * 1024 // 64)  # 2 MiB of text
    status, _, raw = exchange(gw, "PUT", "/echo/upload", body, {"Content-Type": "application/octet-stream"})
    assert status == 200
    echo = json.loads(raw)
    assert echo["body_len"] == len(body)
    assert echo["body"].encode() == body


def test_chunked_request_body_arrives_whole(gw: Gateway) -> None:
    pieces = [b"first piece, ", b"second \xc3\xa9 piece, ", b"x" * 70000, b" and the end"]
    head = (b"POST /echo/chunked?via=raw HTTP/1.1\r\nHost: client.example\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: text/plain\r\nConnection: close\r\n\r\n")
    frames = [head] + [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces] + [b"0\r\n\r\n"]
    status, headers, raw = split_response(raw_exchange(gw.port, frames))
    assert status == 200, raw
    echo = json.loads(raw)
    expected = b"".join(pieces)
    assert echo["body_len"] == len(expected)
    assert echo["body"].encode() == expected
    sent = lower(echo["headers"])
    assert sent["content-length"] == str(len(expected))  # re-framed for the backend
    assert "transfer-encoding" not in sent
    assert echo["query"] == "via=raw"


def test_expect_100_continue(gw: Gateway) -> None:
    # curl sends this for large uploads: the interim answer comes first, then the body goes out.
    body = b"e" * 5000
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"PUT /echo/expect HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nConnection: close\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode())
        interim = s.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        s.sendall(body)
        raw = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        while chunk := s.recv(65536):
            raw += chunk
    status, headers, payload = split_response(raw)
    assert status == 200, raw[:300]
    assert json.loads(payload)["body_len"] == len(body)
    assert FRESH_ID.fullmatch(headers["x-request-id"])


def test_pipelined_requests_behind_a_slow_one(gw: Gateway) -> None:
    # Bytes of the next request waiting on the socket must not be taken for a client that left.
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"pipelined {time.time()}"}]}).encode()
    first = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
             b"X-Mock-TTFT: 0.6\r\nX-Mock-Tokens: 1\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    second = b"GET /echo/second HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    raw = raw_exchange(gw.port, first + second)
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 2, raw[:500]
    assert b'"path": "/echo/second"' in raw


def test_concurrent_requests_are_not_serialised(gw: Gateway) -> None:
    # 24 requests that each take 0.5 s at the backend: together well under 24 x 0.5 s.
    def one(i: int) -> int:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"parallel {i} {time.time()}"}]})
        status, _, _ = exchange(gw, "POST", "/v1/chat/completions", body.encode(),
                                {"Content-Type": "application/json", "X-Mock-TTFT": "0.5", "X-Mock-Tokens": "1"})
        return status

    started = time.monotonic()
    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(one, range(24)))
    took = time.monotonic() - started
    assert statuses == [200] * 24
    assert took < 3.0, f"24 concurrent 0.5 s requests took {took:.2f}s"


def test_large_response_body_passes_unchanged(gw: Gateway) -> None:
    n = 3 * 1024 * 1024 + 7
    status, _, raw = exchange(gw, "GET", f"/bytes?n={n}&chunk=100000")
    assert status == 200
    assert len(raw) == n
    pattern = b"0123456789abcdef"
    assert raw == (pattern * (n // 16 + 1))[:n]


def test_backend_errors_pass_through_unchanged(gw: Gateway) -> None:
    status, headers, raw = exchange(gw, "POST", "/v1/chat/completions", json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "rate me"}]}).encode(),
        {"Content-Type": "application/json", "X-Mock-Status": "429"})
    assert status == 429
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"  # the backend's own body
    assert headers["x-mock-instance"] in ("a", "b")
    assert FRESH_ID.fullmatch(headers["x-request-id"])
    status, _, raw = exchange(gw, "GET", "/v1/no/such/route")
    assert status == 404
    assert json.loads(raw)["error"]["code"] == 404


def test_keep_alive_client_connection(gw: Gateway) -> None:
    conn = HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        for i in range(20):
            conn.request("POST", f"/echo/ka/{i}", body=f"body {i}".encode())
            resp = conn.getresponse()
            echo = json.loads(resp.read())
            assert resp.status == 200
            assert (echo["path"], echo["body"]) == (f"/echo/ka/{i}", f"body {i}")
            assert resp.getheader("Connection", "").lower() != "close"
    finally:
        conn.close()


# ----------------------------------------------------------------------------- headers


def test_end_to_end_headers_pass_and_hop_by_hop_do_not(gw: Gateway) -> None:
    status, _, raw = exchange(gw, "POST", "/echo/headers", b"{}", {
        "Authorization": "Bearer sk-test-123",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "User-Agent": "ntonix-tests/1.0",
        "X-Custom": "one, two",
        "OpenAI-Organization": "org-1",
        "Connection": "keep-alive, X-Hop-Only",
        "X-Hop-Only": "secret-for-the-proxy",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic cHJveHk6cHc=",
        "TE": "trailers",
    })
    assert status == 200, raw
    got = lower(json.loads(raw)["headers"])
    assert got["authorization"] == "Bearer sk-test-123"
    assert got["content-type"] == "application/json"
    assert got["accept"] == "text/event-stream"
    assert got["user-agent"] == "ntonix-tests/1.0"
    assert got["x-custom"] == "one, two"
    assert got["openai-organization"] == "org-1"
    for hop in ("connection", "x-hop-only", "keep-alive", "proxy-authorization", "te", "transfer-encoding"):
        assert hop not in got, f"{hop} was forwarded"


def test_proxy_headers_added(gw: Gateway) -> None:
    status, _, raw = exchange(gw, "GET", "/echo/proxy-headers", headers={
        "X-Forwarded-For": "203.0.113.5, 198.51.100.7",
        "X-Real-IP": "6.6.6.6",
        "X-Forwarded-Proto": "https",  # a client cannot claim TLS it did not use
        "Host": "api.example.test:8080",
    })
    assert status == 200
    got = lower(json.loads(raw)["headers"])
    assert got["x-forwarded-for"] == "203.0.113.5, 198.51.100.7, 127.0.0.1"
    assert got["x-real-ip"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-host"] == "api.example.test:8080"


def test_forwarded_for_without_client_header(gw: Gateway) -> None:
    _, _, raw = exchange(gw, "GET", "/echo/xff")
    got = lower(json.loads(raw)["headers"])
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-real-ip"] == "127.0.0.1"


def test_client_request_id_is_kept_and_echoed(gw: Gateway) -> None:
    rid = "client-req_42.a:b"
    status, headers, raw = exchange(gw, "POST", "/echo/rid", b"x", {"X-Request-ID": rid})
    assert status == 200
    assert headers["x-request-id"] == rid
    assert lower(json.loads(raw)["headers"])["x-request-id"] == rid


def test_fresh_request_id_when_absent(gw: Gateway) -> None:
    seen = set()
    for _ in range(5):
        _, headers, raw = exchange(gw, "GET", "/echo/rid")
        rid = headers["x-request-id"]
        assert FRESH_ID.fullmatch(rid), rid
        assert lower(json.loads(raw)["headers"])["x-request-id"] == rid  # the backend saw the same id
        seen.add(rid)
    assert len(seen) == 5


@pytest.mark.parametrize("bad", ["x" * 200, "has spaces in it", "<script>alert(1)</script>", "semi;colon",
                                 "caf\xe9"])
def test_insane_request_id_is_replaced(gw: Gateway, bad: str) -> None:
    request = (f"GET /echo/rid HTTP/1.1\r\nHost: x\r\nX-Request-ID: {bad}\r\nConnection: close\r\n\r\n"
               ).encode("latin-1")
    status, headers, raw = split_response(raw_exchange(gw.port, request))
    assert status == 200, raw
    rid = headers["x-request-id"]
    assert FRESH_ID.fullmatch(rid), rid
    assert lower(json.loads(raw)["headers"])["x-request-id"] == rid


def test_request_id_on_every_response(gw: Gateway) -> None:
    cases: list[tuple[str, str, Any, dict[str, str]]] = [
        ("GET", "/health", None, {}),
        ("GET", "/metrics", None, {}),
        ("GET", "/cache/stats", None, {}),
        ("POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"}),
        ("POST", "/v1/embeddings", b"[]", {"Content-Type": "application/json"}),
        ("GET", "/v1/models", None, {}),
        ("GET", "/nowhere", None, {}),
    ]
    for method, path, body, headers in cases:
        _, got, _ = exchange(gw, method, path, body, headers)
        assert FRESH_ID.fullmatch(got.get("x-request-id", "")), (method, path, got)
        _, got, _ = exchange(gw, method, path, body, {**headers, "X-Request-ID": "mine-1"})
        assert got.get("x-request-id") == "mine-1", (method, path, got)


# ----------------------------------------------------------------------------- weights


def test_weights_1_to_3(gw: Gateway, backends: tuple[MockBackend, MockBackend]) -> None:
    def one(i: int) -> str:
        status, headers, _ = exchange(gw, "POST", f"/echo/weights/{i}", f"request {i} {time.time()}".encode())
        assert status == 200
        return headers["x-mock-instance"]

    with ThreadPoolExecutor(8) as pool:
        counts = Counter(pool.map(one, range(400)))
    assert sum(counts.values()) == 400
    share_a = counts["a"] / 400 * 100
    assert 20 <= share_a <= 30, counts
    assert 70 <= 100 - share_a <= 80, counts


@pytest.mark.parametrize("value", ["close, X-Foo", "keep-alive, close", "X-Foo,Close"])
@pytest.mark.parametrize("path", ["/health", "/v1/models/whatever"])
def test_connection_close_among_other_options_closes_the_connection(gw: Gateway, value: str, path: str) -> None:
    # Connection is a list of options (RFC 9110 §7.6.1): gunicorn compared the whole value with
    # "close", so "close, X-Foo" kept the connection open.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=3) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: {value}\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):  # the gateway closes after its answer; a timeout fails
            raw += chunk
    status, headers, _ = split_response(raw)
    assert status in (200, 404) and headers["connection"] == "close"
