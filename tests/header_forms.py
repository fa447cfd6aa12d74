"""Header lists in other shapes than a WSGI environ, for the header tests only.

``ntonix.core.headers`` works on the environ (the hot path); these turn (name, value) pairs into an
environ and back, so tests can state headers the way a client sends them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ntonix.core.headers import Networks, _environ_key, _header_name, forward_environ_headers


def environ_headers(environ: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Request headers from a WSGI environ as (Name-Case, value) pairs."""
    out = [(_header_name(key), value) for key, value in environ.items() if key.startswith("HTTP_")]
    if environ.get("CONTENT_TYPE"):
        out.append(("Content-Type", environ["CONTENT_TYPE"]))
    return out


def forward_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    remote_addr: str,
    scheme: str,
    request_id: str,
    trusted: Networks = (),
) -> tuple[list[tuple[str, str]], str]:
    """``forward_environ_headers`` for headers given as (name, value) pairs."""
    environ: dict[str, str] = {}
    for name, value in headers:
        key = "CONTENT_TYPE" if name.lower() == "content-type" else _environ_key(name)
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return forward_environ_headers(environ, remote_addr=remote_addr, scheme=scheme, request_id=request_id,
                                   trusted=trusted)
