"""Errors carry their status; ``render_error`` turns any of them into the OpenAI shape."""

from __future__ import annotations

import json

import pytest

from ntonix.errors import (
    BadRequest,
    NoHealthyBackend,
    NtonixError,
    PayloadTooLarge,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
    render_error,
)


@pytest.mark.parametrize(("cls", "status", "line"), [
    (BadRequest, 400, "400 Bad Request"),
    (PayloadTooLarge, 413, "413 Payload Too Large"),
    (UpstreamUnavailable, 502, "502 Bad Gateway"),
    (NoHealthyBackend, 503, "503 Service Unavailable"),
    (UpstreamTimeout, 504, "504 Gateway Timeout"),
    (NtonixError, 500, "500 Internal Server Error"),
])
def test_render_error_openai_shape(cls: type[NtonixError], status: int, line: str) -> None:
    err = cls("something went wrong")
    assert err.status == status
    status_line, headers, body = render_error(err)
    assert status_line == line
    data = json.loads(body)
    assert set(data) == {"error"}
    assert set(data["error"]) == {"message", "type", "code"}
    assert data["error"]["message"] == "something went wrong"
    assert isinstance(data["error"]["type"], str) and data["error"]["type"]
    assert data["error"]["code"] == cls.code
    names = dict(headers)
    assert names["Content-Type"] == "application/json"
    assert names["Content-Length"] == str(len(body))
    assert "Retry-After" not in names


def test_client_errors_are_invalid_request_errors() -> None:
    for cls in (BadRequest, PayloadTooLarge):
        assert cls.type == "invalid_request_error"
    for cls in (UpstreamUnavailable, NoHealthyBackend, UpstreamTimeout):
        assert cls.type != "invalid_request_error"


def test_only_errors_raised_before_the_body_was_read_close_the_connection() -> None:
    assert RequestTimeout("x").closes_connection and PayloadTooLarge("x").closes_connection
    for cls in (BadRequest, UpstreamUnavailable, NoHealthyBackend, UpstreamTimeout, NtonixError):
        assert not cls.closes_connection


def test_retry_after_header() -> None:
    _, headers, _ = render_error(NoHealthyBackend("none", retry_after=5))
    assert ("Retry-After", "5") in headers


def test_errors_are_exceptions_with_their_message() -> None:
    with pytest.raises(NtonixError) as info:
        raise UpstreamTimeout("too slow")
    assert str(info.value) == "too slow" == info.value.message


def test_message_is_escaped_json() -> None:
    body = error_body('bad "quote"\n\u00e9', "invalid_request_error", "x")
    assert json.loads(body)["error"]["message"] == 'bad "quote"\n\u00e9'
    assert b"\n" not in body
