"""``cache.redis_url`` read once, the way redis-py reads it (pure): checked at start-up, and the
address our own RESP client (ntonix/cluster/resp.py) connects to.

    redis://[[user]:password@]host[:port][/db]      TCP
    rediss://[[user]:password@]host[:port][/db]     TCP with TLS; ?ssl_cert_reqs=none|optional|required,
                                                    ?ssl_ca_certs=/path (default: the system's CAs)
    unix://[[user]:password@]/path/to/socket[?db=N] a Unix socket
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["RedisAddress", "parse_redis_url", "redacted"]

_CERT_REQS = ("none", "optional", "required")


@dataclass(frozen=True, slots=True)
class RedisAddress:
    scheme: str  # redis, rediss or unix
    host: str  # TCP: the host; unix: ""
    port: int  # TCP: the port; unix: 0
    path: str  # unix: the socket's path; TCP: ""
    db: int
    username: str | None
    password: str | None
    cert_reqs: str = "required"  # rediss: none, optional or required
    ca_certs: str | None = None  # rediss: a CA file instead of the system's

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"


def parse_redis_url(url: str) -> RedisAddress:
    """The address of ``url``; ``ValueError`` with the reason when it is not one."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must start with redis://, rediss:// or unix://")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if password is None and username is not None:
        username, password = None, username  # redis://:pw@ and redis://pw@ alike
    if "password" in query:
        password = query["password"]
    db_text = query.get("db", "")
    if scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs the socket's path, e.g. unix:///run/redis/redis.sock")
        host, port, path = "", 0, unquote(parts.path)
    else:
        host = parts.hostname or ""
        if not host:
            raise ValueError("needs a host, e.g. redis://127.0.0.1:6379/0")
        try:
            port = parts.port or 6379
        except ValueError:
            got = parts.netloc.rpartition(":")[2]
            raise ValueError(f"the port must be a number from 1 to 65535, got {got!r}") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"the port must be a number from 1 to 65535, got {port}")
        path = ""
        db_text = parts.path.lstrip("/") or db_text
    if db_text and not db_text.isdigit():
        raise ValueError(f"the database must be a number (0, 1, ...), got {db_text!r}")
    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got {cert_reqs!r}")
    return RedisAddress(scheme, host, port, path, int(db_text or 0), username, password, cert_reqs,
                        query.get("ssl_ca_certs") or None)


def redacted(url: str) -> str:
    """``url`` with its credentials hidden, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
