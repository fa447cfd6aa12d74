"""Header rewriting between client and backend (ntonix.core.headers), with plain values."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ntonix.core.headers import (
    HOP_BY_HOP,
    client_ip,
    forward_response_headers,
    header_value,
    parse_networks,
    request_id_from,
)
from tests.header_forms import environ_headers, forward_request_headers

TRUSTED = parse_networks(["10.0.0.0/8", "::1/128"])


def forward(headers: list[tuple[str, str]], remote: str = "192.0.2.7", scheme: str = "http",
            rid: str = "rid-1", trusted: Any = ()) -> tuple[dict[str, str], list[tuple[str, str]], str]:
    out, real = forward_request_headers(headers, remote_addr=remote, scheme=scheme, request_id=rid, trusted=trusted)
    names = [n.lower() for n, _ in out]
    assert len(names) == len(set(names)), f"duplicate headers in {out}"
    return {n.lower(): v for n, v in out}, out, real


# ----------------------------------------------------------------------------- requests


def test_end_to_end_headers_pass_unchanged() -> None:
    given = [("Authorization", "Bearer sk-secret"), ("Content-Type", "application/json"),
             ("Accept", "text/event-stream"), ("User-Agent", "openai/1.0"), ("X-Custom", "a, b ,c"),
             ("Cache-Control", "no-cache"), ("Cookie", "a=1; b=2")]
    _, out, _ = forward(given)
    for pair in given:
        assert pair in out


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_hop_by_hop_headers_are_dropped(name: str) -> None:
    got, _, _ = forward([(name.title(), "x"), ("Authorization", "Bearer k")])
    assert name not in got
    assert got["authorization"] == "Bearer k"


def test_standard_hop_by_hop_set() -> None:
    assert {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
            "transfer-encoding", "upgrade"} <= HOP_BY_HOP


def test_headers_named_in_connection_are_dropped() -> None:
    got, _, _ = forward([("Connection", "keep-alive, X-Session-Hop ,  x-other"), ("X-Session-Hop", "1"),
                         ("X-Other", "2"), ("X-Kept", "3")])
    assert "x-session-hop" not in got and "x-other" not in got and "connection" not in got
    assert got["x-kept"] == "3"


def test_forwarded_for_is_appended() -> None:
    got, _, _ = forward([("X-Forwarded-For", "203.0.113.1, 198.51.100.2")])
    assert got["x-forwarded-for"] == "203.0.113.1, 198.51.100.2, 192.0.2.7"
    got, _, _ = forward([])
    assert got["x-forwarded-for"] == "192.0.2.7"


def test_proxy_headers_set_and_client_copies_replaced() -> None:
    got, out, real = forward([("X-Real-IP", "6.6.6.6"), ("X-Forwarded-Proto", "https"), ("Host", "gw.example:8080"),
                              ("X-Request-ID", "client-id"), ("Content-Length", "12")], scheme="http", rid="ours")
    assert got["x-real-ip"] == "192.0.2.7" == real
    assert got["x-forwarded-proto"] == "http"
    assert got["x-request-id"] == "ours"
    assert got["x-forwarded-host"] == "gw.example:8080"
    assert "host" not in got  # set per backend by the proxy
    assert "content-length" not in got  # set by the transport from the body it sends
    assert ("X-Forwarded-Proto", "https") not in out


def test_forwarded_proto_https() -> None:
    got, _, _ = forward([], scheme="https")
    assert got["x-forwarded-proto"] == "https"


def test_real_ip_ignores_forwarded_for_from_untrusted_client() -> None:
    got, _, real = forward([("X-Forwarded-For", "1.1.1.1")], remote="192.0.2.7", trusted=TRUSTED)
    assert real == "192.0.2.7" == got["x-real-ip"]
    got, _, real = forward([("X-Forwarded-For", "1.1.1.1")], remote="192.0.2.7")
    assert real == "192.0.2.7"


def test_real_ip_walks_past_trusted_proxies() -> None:
    got, _, real = forward([("X-Forwarded-For", "6.6.6.6, 203.0.113.9, 10.1.1.1")], remote="10.0.0.5",
                           trusted=TRUSTED)
    assert real == "203.0.113.9" == got["x-real-ip"]
    assert got["x-forwarded-for"] == "6.6.6.6, 203.0.113.9, 10.1.1.1, 10.0.0.5"


@pytest.mark.parametrize(("remote", "xff", "expected"), [
    ("10.0.0.5", None, "10.0.0.5"),                  # trusted proxy, no header: itself
    ("10.0.0.5", "10.2.2.2, 10.3.3.3", "10.2.2.2"),  # every hop trusted: the first one
    ("::1", "2001:db8::1", "2001:db8::1"),           # IPv6
    ("10.0.0.5", "garbage, 10.3.3.3", "garbage"),    # not an address: not trusted either
    ("192.0.2.1", "10.2.2.2", "192.0.2.1"),          # untrusted peer
])
def test_client_ip(remote: str, xff: str | None, expected: str) -> None:
    assert client_ip(remote, xff, TRUSTED) == expected


# ----------------------------------------------------------------------------- request id

SANE = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("value", ["abc-123", "A" * 128, "req_1.2:3", "0f8fad5b-d9cb-469f-a165-70867728950e"])
def test_sane_request_id_is_kept(value: str) -> None:
    assert request_id_from(value) == value


@pytest.mark.parametrize("value", [None, "", "a\r\nX-Injected: 1", "a\nb", "a\rb", "A" * 129, "a b", "é",
                                   "<script>", "-leading-dash", "a\x00b", "a;b"])
def test_bad_request_id_is_replaced(value: str | None) -> None:
    rid = request_id_from(value)
    assert rid != value
    assert SANE.fullmatch(rid), rid


def test_new_request_ids_are_unique() -> None:
    ids = {request_id_from(None) for _ in range(1000)}
    assert len(ids) == 1000


# ----------------------------------------------------------------------------- responses


def test_response_hop_by_hop_dropped_and_request_id_ours() -> None:
    out = forward_response_headers([
        ("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked"), ("Connection", "keep-alive, X-Hop"),
        ("Keep-Alive", "timeout=5"), ("X-Hop", "1"), ("X-Request-ID", "backend-id"), ("X-Mock-Instance", "b1"),
        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Cache", "HIT from a CDN"),
    ], "ours")
    assert out == [("Content-Type", "text/event-stream"), ("X-Mock-Instance", "b1"), ("Set-Cookie", "a=1"),
                   ("Set-Cookie", "b=2"), ("X-Request-ID", "ours")]


def test_header_value_is_case_insensitive() -> None:
    headers = [("Content-Type", "a"), ("X-Thing", "b")]
    assert header_value(headers, "content-type") == "a"
    assert header_value(headers, "X-THING") == "b"
    assert header_value(headers, "absent") is None


# ----------------------------------------------------------------------------- environ


def test_environ_headers() -> None:
    environ = {"HTTP_AUTHORIZATION": "Bearer k", "HTTP_X_REQUEST_ID": "r", "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": "10", "REQUEST_METHOD": "POST", "PATH_INFO": "/v1/x", "wsgi.input": object()}
    got = {n.lower(): v for n, v in environ_headers(environ)}
    assert got == {"authorization": "Bearer k", "x-request-id": "r", "content-type": "application/json"}


def test_environ_without_content_type() -> None:
    assert environ_headers({"HTTP_ACCEPT": "*/*", "CONTENT_TYPE": ""}) == [("Accept", "*/*")]
