"""The gateway's own errors through real sockets, each an OpenAI-shaped JSON body:
400 malformed request, 413 body over the limit, 502 backend failed, 503 no healthy backend
(with Retry-After), 504 backend did not answer in time; and a stream that goes silent is cut.

One gateway (one worker, so "the worker keeps serving" means something) in front of one mock
serves most tests: small body limit, 1 s read timeout, fast health checks. Backends that refuse
or misbehave get their own short-lived gateways.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.client import HTTPConnection, IncompleteRead
from typing import Any

import pytest

from tests.live.procs import client_exchange, free_port, split_response, wait_until
from tests.live.procs import raw_exchange as support_raw_exchange
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration

LIMIT = 4096
READ_TIMEOUT = 1.0
API_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("e")


@pytest.fixture(scope="module")
def gw(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([mock], config={
        "proxy": {"max_body_bytes": LIMIT, "read_timeout_s": READ_TIMEOUT},
        "health": {"interval_s": 0.1, "timeout_s": 0.5, "unhealthy_threshold": 1, "healthy_threshold": 1},
        "circuit_breaker": {"failure_threshold": 1000},
    })


@pytest.fixture
def fresh(mock: MockBackend) -> Iterator[MockBackend]:
    mock.reset()
    yield mock
    mock.reset()


def exchange(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    return client_exchange(port, method, path, body, headers, timeout)


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    return split_response(support_raw_exchange(port, data, timeout))


def openai_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, Any]:
    """Check the OpenAI error shape and return the inner object."""
    assert status == expected, (status, body)
    assert headers.get("content-type", "").startswith("application/json"), headers
    data = json.loads(body)
    assert set(data) == {"error"}, data
    err = data["error"]
    assert set(err) >= {"message", "type", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["code"] is not None
    assert re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", headers.get("x-request-id", "")), headers
    return err  # type: ignore[no-any-return]


def chat_body(stream: bool = False) -> bytes:
    return json.dumps({"model": "m", "stream": stream,
                       "messages": [{"role": "user", "content": f"unique {uuid.uuid4()}"}]}).encode()


# ----------------------------------------------------------------------------- 400


@pytest.mark.parametrize("path", API_PATHS)
def test_invalid_json_is_400(gw: Gateway, fresh: MockBackend, path: str) -> None:
    status, headers, body = exchange(gw.port, "POST", path, b'{"model": "m", "messages": [', {
        "Content-Type": "application/json"})
    err = openai_error(status, headers, body, 400)
    assert "JSON" in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert fresh.stats()["requests"] == 0, "an invalid request must not reach a backend"


@pytest.mark.parametrize(("body", "what"), [(b"[1, 2]", "JSON object"), (b'"text"', "JSON object"),
                                            (b"", "empty"), (b"\xff\xfe{}", "JSON")])
def test_not_a_json_object_is_400(gw: Gateway, body: bytes, what: str) -> None:
    status, headers, raw = exchange(gw.port, "POST", "/v1/chat/completions", body,
                                    {"Content-Type": "application/json"})
    err = openai_error(status, headers, raw, 400)
    assert what in err["message"], err


def test_invalid_json_elsewhere_is_forwarded(gw: Gateway) -> None:
    status, _, raw = exchange(gw.port, "POST", "/echo/anything", b"{not json")
    assert status == 200
    assert json.loads(raw)["body"] == "{not json"


# ----------------------------------------------------------------------------- 413


def test_body_over_the_limit_is_413(gw: Gateway, fresh: MockBackend) -> None:
    status, headers, body = exchange(gw.port, "POST", "/v1/chat/completions", b"x" * (LIMIT + 1),
                                     {"Content-Type": "application/json"})
    err = openai_error(status, headers, body, 413)
    assert str(LIMIT) in err["message"], err
    status, headers, body = exchange(gw.port, "PUT", "/echo/big", b"y" * (LIMIT * 4))
    openai_error(status, headers, body, 413)
    assert fresh.stats()["by_path"] == {}, "nothing may reach a backend"


def test_body_at_the_limit_passes(gw: Gateway) -> None:
    status, _, raw = exchange(gw.port, "PUT", "/echo/limit", b"z" * LIMIT)
    assert status == 200
    assert json.loads(raw)["body_len"] == LIMIT


def test_chunked_body_over_the_limit_is_413(gw: Gateway) -> None:
    piece = b"c" * 1000
    chunks = b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    status, headers, body = raw_exchange(gw.port, b"POST /echo/chunked HTTP/1.1\r\nHost: gw\r\n"
                                                  b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    openai_error(status, headers, body, 413)


def test_unread_body_after_413_is_not_taken_for_a_request(gw: Gateway) -> None:
    # The rejected body looks like a request of its own; the gateway must not answer it.
    smuggled = b"GET /echo/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
    body = smuggled + b"p" * (LIMIT + 100)
    data = (b"POST /echo/x HTTP/1.1\r\nHost: gw\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    status, headers, rest = raw_exchange(gw.port, data)
    assert status == 413
    assert headers.get("connection", "").lower() == "close"
    assert b"HTTP/1.1 200" not in rest and b"smuggled" not in rest


# ----------------------------------------------------------------------------- 504 and silent streams


def test_backend_that_does_not_answer_is_504(gw: Gateway, fresh: MockBackend) -> None:
    fresh.control(hang=True)
    started = time.monotonic()
    status, headers, body = exchange(gw.port, "POST", "/v1/chat/completions", chat_body(),
                                     {"Content-Type": "application/json"})
    took = time.monotonic() - started
    err = openai_error(status, headers, body, 504)
    assert err["type"] != "invalid_request_error"
    assert READ_TIMEOUT * 0.9 <= took < READ_TIMEOUT + 2.0, took
    fresh.control(hang=False)
    status, _, _ = exchange(gw.port, "POST", "/v1/chat/completions", chat_body(), {"Content-Type": "application/json"})
    assert status == 200


def test_slow_first_byte_within_the_timeout_is_fine(gw: Gateway) -> None:
    status, _, body = exchange(gw.port, "POST", "/v1/chat/completions", chat_body(),
                               {"Content-Type": "application/json", "X-Mock-TTFT": str(READ_TIMEOUT / 2),
                                "X-Mock-Tokens": "1"})
    assert status == 200, body


def test_stream_that_goes_silent_is_cut(gw: Gateway) -> None:
    conn = HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=chat_body(stream=True), headers={
            "Content-Type": "application/json", "X-Mock-Token-Delay": str(READ_TIMEOUT * 3), "X-Mock-Tokens": "3"})
        resp = conn.getresponse()
        assert resp.status == 200
        started = time.monotonic()
        with pytest.raises(IncompleteRead) as info:
            resp.read()
        took = time.monotonic() - started
    finally:
        conn.close()
    assert info.value.partial.startswith(b"data: {"), info.value.partial  # the first event got through
    assert b"[DONE]" not in info.value.partial
    assert took < READ_TIMEOUT * 2.5, took


def test_stream_that_keeps_flowing_is_never_cut(gw: Gateway) -> None:
    # 8 events 0.3 s apart: 2.1 s in all, more than twice the read timeout.
    conn = HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=chat_body(stream=True), headers={
            "Content-Type": "application/json", "X-Mock-Token-Delay": "0.3", "X-Mock-Tokens": "8"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert body.count(b"data: ") == 9
    assert body.endswith(b"data: [DONE]\n\n")


# ----------------------------------------------------------------------------- malformed HTTP


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
], ids=["garbage", "nul-in-target", "http-9.9", "bad-header-name", "bad-content-length", "long-line",
        "big-header", "many-headers"])
def test_malformed_http_is_answered_in_json_and_the_worker_serves_on(
        gw: Gateway, request_bytes: bytes, expected: int) -> None:
    status, headers, body = raw_exchange(gw.port, request_bytes)
    assert b"<html" not in body.lower()
    openai_error(status, headers, body, expected)
    assert headers["connection"] == "close"
    # The one worker still answers the next client, and requests on it still work.
    status, _, _ = exchange(gw.port, "GET", "/health")
    assert status == 200
    status, _, _ = exchange(gw.port, "GET", "/echo/after-garbage")
    assert status == 200


# ----------------------------------------------------------------------------- 503


def test_no_healthy_backend_is_503_with_retry_after(gw: Gateway, fresh: MockBackend) -> None:
    fresh.control(health_fail=True)
    try:
        wait_until(lambda: gw.health()[0] == 503, timeout=5.0, what="the backend to be marked down")
        status, body = gw.health()
        assert body == {"status": "unavailable", "backends": {"healthy": 0, "total": 1}}
        before = fresh.stats()["requests"]
        status, headers, raw = exchange(gw.port, "POST", "/v1/chat/completions", chat_body(),
                                        {"Content-Type": "application/json"})
        err = openai_error(status, headers, raw, 503)
        assert err["type"] != "invalid_request_error"
        assert int(headers["retry-after"]) >= 1
        assert fresh.stats()["requests"] == before
    finally:
        fresh.control(health_fail=False)
    wait_until(lambda: gw.health()[0] == 200, timeout=5.0, what="the backend to be marked up again")
    status, _, _ = exchange(gw.port, "POST", "/v1/chat/completions", chat_body(), {"Content-Type": "application/json"})
    assert status == 200


# ----------------------------------------------------------------------------- 502 and failover


def test_refused_backend_is_502(gateway: GatewayFactory) -> None:
    dead = f"127.0.0.1:{free_port()}"
    gw = gateway([dead], config={"health": {"enabled": False}})
    started = time.monotonic()
    status, headers, body = exchange(gw.port, "POST", "/v1/chat/completions", chat_body(),
                                     {"Content-Type": "application/json"})
    err = openai_error(status, headers, body, 502)
    assert err["type"] != "invalid_request_error"
    assert time.monotonic() - started < 2.0
    status, headers, body = exchange(gw.port, "GET", "/echo/x")
    openai_error(status, headers, body, 502)


def test_refused_backends_are_tried_in_turn_then_502(gateway: GatewayFactory) -> None:
    # Three dead backends, proxy.retries 1: two are tried, then the client gets its 502.
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    gw = gateway(dead, config={"health": {"enabled": False}, "proxy": {"retries": 1},
                               "circuit_breaker": {"failure_threshold": 100}})
    status, headers, body = exchange(gw.port, "GET", "/echo/x")
    err = openai_error(status, headers, body, 502)
    assert "2 tried" in err["message"], err


def test_refused_backend_fails_over_to_a_live_one(mock_backend: MockBackendFactory, gateway: GatewayFactory) -> None:
    live = mock_backend("live")
    gw = gateway([f"127.0.0.1:{free_port()}", live], config={"health": {"enabled": False},
                                                            "circuit_breaker": {"failure_threshold": 100}})
    for i in range(6):
        status, headers, body = exchange(gw.port, "POST", "/v1/chat/completions", chat_body(),
                                         {"Content-Type": "application/json"})
        assert status == 200, (i, body)
        assert headers["x-mock-instance"] == "live"
    assert live.stats()["requests"] == 6  # each request reached the live backend exactly once


def test_open_breakers_are_503_with_retry_after(gateway: GatewayFactory) -> None:
    gw = gateway([f"127.0.0.1:{free_port()}"], config={
        "health": {"enabled": False}, "circuit_breaker": {"failure_threshold": 2, "cooldown_s": 60}})
    for _ in range(2):
        status, headers, body = exchange(gw.port, "GET", "/echo/x")
        openai_error(status, headers, body, 502)
    status, headers, body = exchange(gw.port, "GET", "/echo/x")
    openai_error(status, headers, body, 503)
    assert int(headers["retry-after"]) >= 1


class Misbehaving:
    """A TCP server in a thread that answers every connection with ``reply`` and closes it."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0  # connections that sent something (a bare connect is a liveness check)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(65536)
                    if not data:
                        continue
                    if data.startswith(b"GET /v1/models "):
                        continue  # the gateway's model discovery: no list here, not a client's request
                    self.requests += 1
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("reply", [b"", b"this is not HTTP\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"],
                         ids=["closes", "garbage", "truncated"])
def test_backend_that_breaks_the_exchange_is_502(gateway: GatewayFactory, reply: bytes) -> None:
    server = Misbehaving(reply)
    try:
        gw = gateway([f"127.0.0.1:{server.port}"], config={"health": {"enabled": False}})
        conn = HTTPConnection("127.0.0.1", gw.port, timeout=10)
        try:
            conn.request("POST", "/v1/chat/completions", body=chat_body(), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if reply.startswith(b"HTTP/1.1 200"):
                # Headers went out already: the client must see a broken body, never a clean short one.
                assert resp.status == 200
                with pytest.raises(IncompleteRead):
                    resp.read()
            else:
                openai_error(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(), 502)
        finally:
            conn.close()
        assert server.requests == 1, "a request that reached a backend is never sent twice"
    finally:
        server.close()
