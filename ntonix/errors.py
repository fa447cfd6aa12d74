"""Errors that carry their HTTP status, and the one place that renders them (OpenAI shape).

Every error the gateway itself answers is one of these classes; the WSGI edge turns them
into ``{"error": {"message", "type", "code"}}`` with ``render_error``.
"""

from __future__ import annotations

import http

import orjson


class NtonixError(Exception):
    """An error the gateway answers itself."""

    status = 500
    type = "server_error"
    code = "internal_error"
    # The connection must close after this answer: the request's body was left unread, and what
    # is left of it must not be parsed as the next request.
    closes_connection = False

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(NtonixError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class IncompleteBody(BadRequest):
    """The client ended its body short of its ``Content-Length``: nothing is forwarded."""

    closes_connection = True


class UnsupportedTransferCoding(NtonixError):
    """A request ``Transfer-Encoding`` other than ``chunked`` (gzip, ...): the gateway cannot
    pass on a body whose coding it would have to drop with the hop-by-hop header."""

    status, type, code = 501, "server_error", "not_implemented"
    closes_connection = True


class Forbidden(NtonixError):
    status, type, code = 403, "permission_error", "forbidden"


class ModelNotFound(NtonixError):
    """No backend serves the requested ``model``."""

    status, type, code = 404, "invalid_request_error", "model_not_found"


class RequestTimeout(NtonixError):
    """The client stopped sending its body."""

    status, type, code = 408, "invalid_request_error", "request_timeout"
    closes_connection = True


class PayloadTooLarge(NtonixError):
    """The body is over the limit; it is not read."""

    status, type, code = 413, "invalid_request_error", "payload_too_large"
    closes_connection = True


class UpstreamUnavailable(NtonixError):
    status, type, code = 502, "upstream_error", "backend_failed"


class NoHealthyBackend(NtonixError):
    status, type, code = 503, "upstream_error", "no_healthy_backend"


class BackendsBusy(NoHealthyBackend):
    """Every backend for the request stayed at its ``max_in_flight`` for ``routing.queue_timeout_s``."""

    code = "backends_busy"


class UpstreamTimeout(NtonixError):
    status, type, code = 504, "upstream_error", "backend_timeout"


# Python 3.11 still says "Request Entity Too Large" (RFC 2616); RFC 7231's name is the one clients know.
_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in http.HTTPStatus} | {413: "413 Payload Too Large"}


def status_line(code: int, reason: str = "Unknown") -> str:
    """The one ``"NNN Phrase"`` for a WSGI status or an HTTP status line; ``reason`` is used
    only for a code ``http.HTTPStatus`` does not know."""
    return _STATUS_LINES.get(code) or f"{code} {reason}"


def error_body(message: str, type_: str, code: str | int | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


def render_error(err: NtonixError) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status line, headers, body) for an error the gateway answers."""
    body = error_body(err.message, err.type, err.code)
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if err.retry_after is not None:
        headers.append(("Retry-After", str(err.retry_after)))
    return status_line(err.status), headers, body
