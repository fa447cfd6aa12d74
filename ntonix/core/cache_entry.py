"""A cached response and its byte encoding: pure values, no I/O.

Encoding (never pickle: a cache directory or a Redis shared with others must not be a way
to run code in the gateway)::

    b"NXC1" | meta length (4 bytes, big-endian) | meta: orjson [status, headers, created, streamed] | body

``created`` is wall-clock time (``time.time()``): entries travel between processes and
hosts, so a per-process monotonic clock would mean nothing to the reader.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

Headers = tuple[tuple[str, str], ...]

_MAGIC = b"NXC1"
_PREFIX = len(_MAGIC) + 4

# Hop-by-hop (RFC 9110 §7.6.1) and headers that describe one particular transfer or
# exchange rather than the content: replaying them would be wrong or misleading.
_DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "set-cookie",
        "set-cookie2",
        "content-length",  # recomputed from the stored body
        "date",
        "server",
        "x-request-id",
        "x-cache",
        "age",
        "via",
    }
)
# Per-request accounting of the upstream (remaining quota, timing): stale on any replay.
_DROPPED_PREFIXES = ("proxy-", "x-ratelimit-", "openai-processing-ms")


class DecodeError(ValueError):
    """Stored bytes are not a cache entry this version understands (treat as a miss)."""


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A complete status-200 answer as the client should see it again.

    ``body`` is the exact byte stream: for a streamed answer the concatenated SSE events,
    replayed as they were sent.
    """

    status: int
    headers: Headers
    body: bytes
    created: float
    streamed: bool

    @property
    def size(self) -> int:
        """Bytes this entry accounts for: body plus headers as they go on the wire."""
        return len(self.body) + sum(len(k) + len(v) + 4 for k, v in self.headers)

    def encode(self) -> bytes:
        meta = orjson.dumps([self.status, self.headers, self.created, self.streamed])
        return b"".join((_MAGIC, len(meta).to_bytes(4, "big"), meta, self.body))

    @classmethod
    def decode(cls, data: bytes) -> CachedResponse:
        """The inverse of :meth:`encode`; raises :class:`DecodeError` on anything else."""
        if data[: len(_MAGIC)] != _MAGIC or len(data) < _PREFIX:
            raise DecodeError("not a cache entry")
        end = _PREFIX + int.from_bytes(data[len(_MAGIC) : _PREFIX], "big")
        if end > len(data):
            raise DecodeError("truncated cache entry")
        try:
            status, headers, created, streamed = orjson.loads(data[_PREFIX:end])
            pairs: Headers = tuple(map(tuple, headers))
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            raise DecodeError(f"malformed cache entry: {exc}") from None
        # Cheap shape checks only (this is on every L2/L3 hit): we wrote these bytes ourselves.
        if type(status) is not int or type(created) is not float or type(streamed) is not bool or any(
            len(p) != 2 for p in pairs
        ):
            raise DecodeError("malformed cache entry")
        return cls(status, pairs, data[end:], created, streamed)

    def __repr__(self) -> str:
        kind = "stream" if self.streamed else "plain"
        return f"<CachedResponse {self.status} {kind} {len(self.body)}B created={self.created:.3f}>"


def replayable_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """The backend's response headers worth replaying on a hit, in their original order.

    Keeps end-to-end content headers (``Content-Type``, ``Content-Encoding``, ``Cache-Control``,
    ``Vary``, ...); drops hop-by-hop headers, also those the ``Connection`` header names,
    cookies, ``Content-Length`` and headers that describe one exchange (``Date``, ``Server``,
    ``X-Request-ID``, ``X-Cache``, rate-limit counters).
    """
    pairs = list(headers)
    named_by_connection = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    kept = []
    for name, value in pairs:
        lower = name.lower()
        if lower in _DROPPED or lower in named_by_connection or lower.startswith(_DROPPED_PREFIXES):
            continue
        kept.append((name, value))
    return tuple(kept)


# What an HTTP/1.1 server lets through of an application's response headers, as gunicorn's
# ``Response.process_headers`` checks them (tests/unit/core/test_cache_entry.py holds the two
# side by side): a name is an RFC 9110 token, a value visible ASCII, obs-text, space or tab.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
# Hop-by-hop names the server drops from an application's headers (it sends its own Server,
# Date and Connection).
_SERVER_OWNED = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
     "transfer-encoding", "upgrade", "server", "date"}
)
_BLANKS = " \t"


def hit_head(headers: Headers, body_length: int) -> bytes | None:
    """The header lines a cache hit sends from the stored answer: its headers as the server
    would put them on the wire (values trimmed of spaces and tabs, server-owned names dropped)
    and its ``Content-Length``, each ending in CRLF; the same bytes the WSGI path writes for
    ``Proxy._replay``'s headers up to its ``X-Request-ID``. ``None`` when a stored header is one
    the server would refuse (the request then takes the WSGI path, which reports it)."""
    lines = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            return None
        if name.lower().strip() in _SERVER_OWNED:
            continue
        lines.append(f"{name}: {value.strip(_BLANKS)}\r\n")
    lines.append(f"Content-Length: {body_length}\r\n")
    return "".join(lines).encode("latin-1")  # every character is below 0x100 (_VALUE)
