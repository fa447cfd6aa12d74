"""Cache keys and the request's cache policy: pure functions, no I/O.

A key is the hex xxh3_128 of three length-framed parts:

1. the partition: blake2b-128 of the request's credentials (``b""`` when it has none), so
   that one credential never receives another's cached answer and no credential is ever kept
   in a recoverable form. The credentials are the values of every header in
   :data:`CREDENTIAL_HEADERS` (plus the operator's ``cache.partition_headers``) that is present
   and not empty, each framed with its name and length, so that a request without any
   credential is a partition of its own and ``X-Api-Key: a`` differs from ``Api-Key: a``;
2. the request path;
3. the canonical JSON of the parsed body: ``orjson`` with ``OPT_SORT_KEYS`` (which sorts the
   keys of nested objects too) and no whitespace, so key order and formatting do not matter
   while every value does.

An integer and a float differ: ``1`` and ``1.0`` give different keys (two spellings of one
float, ``1e2`` and ``100.0``, are one number once parsed). Most backends treat
them alike, but a needless miss costs one backend call while a wrong hit would serve an
answer to a request that was not made; so the cache never decides two values are "equal
enough".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import xxhash

CACHEABLE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

# Headers that carry a credential in OpenAI-compatible APIs and the gateways in front of them:
# bearer tokens (OpenAI, vLLM, llama.cpp), X-Api-Key (Anthropic-style clients, LiteLLM),
# Api-Key (Azure OpenAI), session cookies, and the organisation/project selectors that change
# what an OpenAI key may see (docs/cache.md, "Partitioning").
CREDENTIAL_HEADERS = (
    "Authorization", "Proxy-Authorization", "X-Api-Key", "Api-Key", "Cookie",
    "OpenAI-Organization", "OpenAI-Project",
)


def credential_keys(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The WSGI ``environ`` names of :data:`CREDENTIAL_HEADERS` and ``extra``, each once, in a
    fixed order (computed once at start-up; :func:`credentials` reads them per request)."""
    out: list[str] = []
    for name in (*CREDENTIAL_HEADERS, *extra):
        key = "HTTP_" + name.strip().upper().replace("-", "_")
        if key not in out:
            out.append(key)
    return tuple(out)


def credentials(environ: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    """The request's credential material for :func:`cache_key`: every non-empty header among
    ``keys``, framed as ``<len>:<name><len>:<value>``; ``None`` when there is none."""
    parts = [f"{len(k)}:{k}{len(v)}:{v}" for k in keys if (v := environ.get(k))]
    return "".join(parts) if parts else None


def cache_key(path: str, body: object, credential: str | None, *, variant: str = "") -> str:
    """The cache key (32 hex digits) of a cacheable request.

    ``body`` is the parsed JSON body; ``credential`` what :func:`credentials` found (or any
    other string naming the partition; ``None`` and ``""`` are the partition without one).
    ``variant`` lets the caller fold in anything else the answer depends on (for example a
    normalised ``Accept-Encoding``); ``""`` adds nothing.
    """
    # One hash over the concatenated parts (the same digest as feeding them in turn; made in
    # one call, as the key is made on every cacheable request).
    partition = _NO_CREDENTIAL if not credential else _partition(credential)
    p = path.encode("utf-8", "surrogateescape")
    v = variant.encode("utf-8", "surrogateescape")
    return xxhash.xxh3_128_hexdigest(b"".join((partition, len(p).to_bytes(4, "big"), p, len(v).to_bytes(4, "big"), v,
                                               canonical_json(body))))


def _partition(credential: str) -> bytes:
    return hashlib.blake2b(credential.encode("utf-8", "surrogateescape"), digest_size=16).digest()


_NO_CREDENTIAL = _partition("")


def canonical_json(body: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8; the same bytes for the same JSON value."""
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        # Integers beyond 64 bits (valid JSON) are refused by orjson; the standard library
        # gives the same shape for them.
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def request_cache_policy(cache_control: str | None) -> tuple[bool, bool]:
    """``(may_serve_from_cache, may_store)`` for a request's ``Cache-Control`` header.

    ``no-store`` wins over everything (neither served nor stored, RFC 9111 §5.2.1.5);
    ``no-cache`` and ``max-age=0`` mean "do not answer from the cache" but the fresh answer
    may be stored (§5.2.1.4, §5.2.1.1). Directive names are case-insensitive; unknown
    directives and malformed parts are ignored.
    """
    if not cache_control:
        return True, True
    serve, store = True, True
    for name, value in _directives(cache_control):
        if name == "no-store":
            serve, store = False, False
        elif name == "no-cache" or (name == "max-age" and value is not None and value.strip('" ') == "0"):
            serve = False
    return serve, store


def _directives(header: str) -> list[tuple[str, str | None]]:
    """Split ``a, b=1, c="x, y"`` into ``[("a", None), ("b", "1"), ("c", "x, y")]``."""
    out: list[tuple[str, str | None]] = []
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if name:
            out.append((name, value.strip() if eq else None))
    return out
