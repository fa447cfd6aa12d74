"""Errors that carry their HTTP status, and the one place that renders them (OpenAI shape).

Every error the gateway itself answers is one of these classes; the WSGI edge turns them
into ``{"error": {"message", "type", "code"}}`` with ``render_error``.
"""

from __future__ import annotations

import orjson


class NtonixError(Exception):
    """An error the gateway answers itself."""

    status = 500
    reason = "Internal Server Error"
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(NtonixError):
    status, reason, type, code = 400, "Bad Request", "invalid_request_error", "invalid_request"


class Forbidden(NtonixError):
    status, reason, type, code = 403, "Forbidden", "permission_error", "forbidden"


class NotFound(NtonixError):
    status, reason, type, code = 404, "Not Found", "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTimeout(NtonixError):
    status, reason, type, code = 408, "Request Timeout", "invalid_request_error", "request_timeout"


class PayloadTooLarge(NtonixError):
    status, reason, type, code = 413, "Payload Too Large", "invalid_request_error", "payload_too_large"


class HeadersTooLarge(NtonixError):
    status, reason, type, code = 431, "Request Header Fields Too Large", "invalid_request_error", "headers_too_large"


class UpstreamUnavailable(NtonixError):
    status, reason, type, code = 502, "Bad Gateway", "upstream_error", "backend_failed"


class NoHealthyBackend(NtonixError):
    status, reason, type, code = 503, "Service Unavailable", "upstream_error", "no_healthy_backend"


class BackendsBusy(NoHealthyBackend):
    """Every backend for the request stayed at its ``max_in_flight`` for ``routing.queue_timeout_s``."""

    code = "backends_busy"


class UpstreamTimeout(NtonixError):
    status, reason, type, code = 504, "Gateway Timeout", "upstream_error", "backend_timeout"


def error_body(status: int, message: str, type_: str, code: str | int | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


def render_error(err: NtonixError) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status line, headers, body) for an error the gateway answers."""
    body = error_body(err.status, err.message, err.type, err.code)
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if err.retry_after is not None:
        headers.append(("Retry-After", str(err.retry_after)))
    return f"{err.status} {err.reason}", headers, body
