"""Header rewriting between client and backend (pure: plain values in, plain values out).

Requests: every end-to-end header passes unchanged (Authorization included); hop-by-hop
headers (RFC 9110 §7.6.1, plus any named in ``Connection``) are dropped; the proxy headers
``X-Forwarded-For`` (appended to, never replaced), ``X-Real-IP``, ``X-Forwarded-Proto`` and
``X-Request-ID`` are set. ``Host`` becomes the backend's, the client's goes in
``X-Forwarded-Host`` (nginx's default ``proxy_set_header Host $proxy_host``).

Responses: hop-by-hop headers are dropped the same way and ``X-Request-ID`` is ours.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Set by the gateway itself; a client's copy is replaced (X-Forwarded-For is appended to).
# ``Expect`` too: the gateway has read the whole body already, a 100 Continue would only confuse.
_OWN = frozenset({"host", "x-real-ip", "x-forwarded-proto", "x-request-id", "x-forwarded-for",
                  "x-forwarded-host", "content-length", "expect"})
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
# CGI names for the two headers WSGI keeps outside HTTP_*.

Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


_id_prefix = os.urandom(10).hex()
_id_counter = itertools.count(1)


def _new_id_prefix() -> None:
    global _id_prefix
    _id_prefix = os.urandom(10).hex()


os.register_at_fork(after_in_child=_new_id_prefix)


def new_request_id() -> str:
    """Unique without a syscall per request: a random per-process prefix and a counter."""
    return f"{_id_prefix}{next(_id_counter):012x}"


def request_id_from(client_value: str | None) -> str:
    """The client's X-Request-ID if it is sane (short, no CR/LF or odd bytes), else a new one."""
    if client_value and _SANE_REQUEST_ID.fullmatch(client_value):
        return client_value
    return new_request_id()


def parse_networks(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def in_networks(address: str, networks: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_ip(remote_addr: str, forwarded_for: str | None, trusted: Networks) -> str:
    """The real client address: walk X-Forwarded-For right to left past trusted proxies."""
    if not trusted or not in_networks(remote_addr, trusted):
        return remote_addr
    hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not in_networks(hop, trusted):
            return hop
    return hops[0] if hops else remote_addr


def _connection_tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


_NAMES: dict[str, str] = {}  # environ key -> header name, filled as keys are seen


def _header_name(key: str) -> str:
    name = _NAMES.get(key)
    if name is None:
        name = key[5:].replace("_", "-").title() if key.startswith("HTTP_") else key
        if len(_NAMES) < 4096:  # bounded: clients choose header names
            _NAMES[key] = name
    return name


def _environ_key(name: str) -> str:
    return "HTTP_" + name.upper().replace("-", "_")


_DROP_KEYS = frozenset(_environ_key(n) for n in HOP_BY_HOP | _OWN)


def forward_environ_headers(
    environ: Mapping[str, Any],
    *,
    remote_addr: str,
    scheme: str,
    request_id: str,
    trusted: Networks = (),
) -> tuple[list[tuple[str, str]], str]:
    """Headers for the backend request (``Host`` is added per backend), and the client address
    we believe (for logs), straight from a WSGI environ in one pass (the hot path)."""
    connection = environ.get("HTTP_CONNECTION")
    drop = _DROP_KEYS
    if connection:
        drop = drop | {_environ_key(t) for t in _connection_tokens(connection)}
    out = [(_header_name(key), value) for key, value in environ.items()
           if key.startswith("HTTP_") and key not in drop]
    content_type = environ.get("CONTENT_TYPE")
    if content_type and "HTTP_CONTENT_TYPE" not in drop:  # in drop only when Connection names it
        out.append(("Content-Type", content_type))
    prior = environ.get("HTTP_X_FORWARDED_FOR")
    host = environ.get("HTTP_HOST")
    if host:
        out.append(("X-Forwarded-Host", host))
    out.append(("X-Forwarded-For", f"{prior}, {remote_addr}" if prior else remote_addr))
    real = client_ip(remote_addr, prior, trusted)
    out.append(("X-Real-IP", real))
    out.append(("X-Forwarded-Proto", scheme))
    out.append(("X-Request-ID", request_id))
    return out, real


def forward_response_headers(headers: Iterable[tuple[str, str]], request_id: str) -> list[tuple[str, str]]:
    """Backend response headers for the client: hop-by-hop dropped, our X-Request-ID (the
    caller adds our X-Cache: a backend's own, e.g. another gateway's, is dropped too)."""
    headers = list(headers)
    conn = next((v for n, v in headers if n.lower() == "connection"), None)
    drop = HOP_BY_HOP | _connection_tokens(conn) | {"x-request-id", "x-cache"}
    out = [(name, value) for name, value in headers if name.lower() not in drop]
    out.append(("X-Request-ID", request_id))
    return out


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for n, v in headers:
        if n.lower() == name:
            return v
    return None
