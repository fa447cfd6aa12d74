"""The RESP parser and encoder of ntonix/cluster/resp.py, with plain bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.cluster.resp import Pool, ProtocolError, RespError, encode, encode_many, parse


def test_encode_is_an_array_of_bulk_strings() -> None:
    assert encode("GET", b"k\r\n", 12) == b"*3\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"


_ARG = st.one_of(st.text(), st.binary(), st.integers())


def _bulk(a: bytes | str | int) -> bytes:
    b = a if isinstance(a, bytes) else str(a).encode()
    return b"$%d\r\n" % len(b) + b + b"\r\n"


@given(st.lists(st.lists(_ARG, min_size=1, max_size=8), min_size=1, max_size=4))
def test_encode_frames_any_text_bytes_and_numbers_as_resp_defines(commands: list[list[bytes | str | int]]) -> None:
    """Text (ASCII or not), bytes with CR LF inside, and integers: each argument a bulk string
    of its UTF-8 bytes; a pipeline is the commands one after the other."""
    expected = [b"*%d\r\n" % len(c) + b"".join(_bulk(a) for a in c) for c in commands]
    assert [encode(*c) for c in commands] == expected
    assert encode_many([tuple(c) for c in commands]) == b"".join(expected)
    for c, raw in zip(commands, expected, strict=True):
        parsed = parse(raw)
        assert parsed is not None and parsed[0] == [_bulk(a)[_bulk(a).index(b"\n") + 1:-2] for a in c]


@pytest.mark.parametrize(("raw", "value"), [
    (b"+OK\r\n", b"OK"),
    (b":42\r\n", 42),
    (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*3\r\n$1\r\na\r\n:1\r\n*1\r\n$0\r\n\r\n", [b"a", 1, [b""]]),
])
def test_parse_every_reply_type(raw: bytes, value: object) -> None:
    assert parse(raw + b"+next\r\n") == (value, len(raw))


def test_an_error_reply_is_a_value_not_an_exception() -> None:
    got = parse(b"-NOSCRIPT No matching script\r\n")
    assert got is not None and isinstance(got[0], RespError) and str(got[0]).startswith("NOSCRIPT")


@pytest.mark.parametrize("raw", [b"", b"+OK", b"$5\r\nhel", b"$5\r\nhello\r", b"*2\r\n:1\r\n", b"*2\r\n:1\r\n$3\r\nab"])
def test_an_incomplete_reply_asks_for_more(raw: bytes) -> None:
    assert parse(raw) is None


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6380/2", ("redis", "127.0.0.1", 6380, "", 2, None, None)),
    ("redis://:s%40cret@h", ("redis", "h", 6379, "", 0, None, "s@cret")),
    ("redis://pw@h:1/0", ("redis", "h", 1, "", 0, None, "pw")),
    ("redis://user:pw@h/", ("redis", "h", 6379, "", 0, "user", "pw")),
    ("rediss://h:6380/1", ("rediss", "h", 6380, "", 1, None, None)),
    ("unix:///run/redis/r.sock?db=3", ("unix", "", 0, "/run/redis/r.sock", 3, None, None)),
    ("unix://:pw@/tmp/r%20s.sock", ("unix", "", 0, "/tmp/r s.sock", 0, None, "pw")),
])
def test_pool_reads_the_url(url: str, expected: tuple[object, ...]) -> None:
    a = Pool(url, 0.05).address
    assert (a.scheme, a.host, a.port, a.path, a.db, a.username, a.password) == expected


@pytest.mark.parametrize(("url", "why"), [
    ("http://h", "must start with"), ("redis://h:99999/0", "port"), ("redis://h:x/0", "port"),
    ("redis://h/abc", "database"), ("redis://", "host"), ("unix://", "path"),
    ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"), ("unix:///r.sock?db=x", "database"),
])
def test_pool_refuses_what_is_no_redis_address(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Pool(url, 0.05)
