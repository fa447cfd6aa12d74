"""``hit_head``: the header lines of a cache hit, as gunicorn's ``Response`` would write them."""

from __future__ import annotations

import pytest
from gunicorn.config import Config as GConfig
from gunicorn.http.wsgi import Response

from ntonix.core.cache_entry import Headers, hit_head


class _Req:
    method = "POST"
    version = (1, 1)


def gunicorn_lines(headers: Headers, body_length: int) -> bytes | None:
    """What gunicorn's own ``Response`` sends of these app headers (after its status line,
    Server, Date and Connection), or None where it refuses them."""
    resp = Response(_Req(), None, GConfig())
    try:
        resp.start_response("200 OK", [*headers, ("Content-Length", str(body_length))])
    except Exception:  # noqa: BLE001 - gunicorn raises several kinds for a header it refuses
        return None
    return "".join(f"{k}: {v}\r\n" for k, v in resp.headers).encode("latin-1")


CASES: list[Headers] = [
    (),
    (("Content-Type", "application/json"),),
    (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("X-Model", "m-1")),
    (("X-Padded", "  spaced\t "), ("x-lower", "v")),
    (("Server", "uvicorn"), ("Date", "Mon"), ("Trailers", "x"), ("Keep-Alive", "5"), ("Upgrade", "h2c"),
     ("Proxy-Authenticate", "Basic"), ("Content-Type", "application/json")),
    (("X-Latin", "caf\xe9"),),
    (("X-Bad", "a\r\nInjected: 1"),),
    (("X-Nul", "a\x00b"),),
    (("Bad Name", "v"),),
    (("X-Wide", "\u20ac"),),
    (("", "v"),),
]


@pytest.mark.parametrize("headers", CASES)
def test_hit_head_is_what_gunicorn_sends_for_the_same_headers(headers: Headers) -> None:
    assert hit_head(headers, 321) == gunicorn_lines(headers, 321)


def test_hit_head_ends_with_the_length_of_the_body() -> None:
    assert hit_head((("Content-Type", "application/json"),), 0) == (
        b"Content-Type: application/json\r\nContent-Length: 0\r\n")


def test_a_header_the_server_would_refuse_gives_none() -> None:
    assert hit_head((("Content-Type", "application/json"), ("X-Bad", "a\nb")), 5) is None
