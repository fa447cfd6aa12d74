from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.cache_entry import CachedResponse, DecodeError, replayable_headers
from ntonix.core.cache_key import (
    CACHEABLE_PATHS,
    cache_key,
    canonical_json,
    credential_keys,
    credentials,
    request_cache_policy,
)

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}


def test_cacheable_paths() -> None:
    expected = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    assert expected == CACHEABLE_PATHS


def test_key_is_32_hex_digits_and_stable() -> None:
    key = cache_key(CHAT, BODY, "Bearer a")
    assert len(key) == 32 and int(key, 16) >= 0
    assert cache_key(CHAT, BODY, "Bearer a") == key


def test_key_order_and_whitespace_do_not_matter_at_any_depth() -> None:
    text = '{ "temperature": 0.2, "messages": [ {"content": "hi", "role": "user"} ], "model": "m" }'
    assert cache_key(CHAT, json.loads(text), None) == cache_key(CHAT, BODY, None)
    nested = {"b": {"z": 1, "a": 2}, "a": [{"y": 1, "x": 2}]}
    assert canonical_json(nested) == b'{"a":[{"x":2,"y":1}],"b":{"a":2,"z":1}}'


@pytest.mark.parametrize(
    "change",
    [{"model": "other"}, {"temperature": 0.3}, {"stream": True}, {"messages": []}, {"max_tokens": 5}],
)
def test_every_field_matters(change: dict[str, object]) -> None:
    assert cache_key(CHAT, {**BODY, **change}, None) != cache_key(CHAT, BODY, None)


def test_list_order_matters() -> None:
    assert cache_key(CHAT, {"input": ["a", "b"]}, None) != cache_key(CHAT, {"input": ["b", "a"]}, None)


def test_int_and_float_are_distinct() -> None:
    # Documented choice: values are taken as written; a needless miss is cheaper than a wrong hit.
    assert cache_key(CHAT, {"temperature": 1}, None) != cache_key(CHAT, {"temperature": 1.0}, None)


def test_partitioned_by_authorization_and_path() -> None:
    keys = {
        cache_key(CHAT, BODY, None),
        cache_key(CHAT, BODY, ""),
        cache_key(CHAT, BODY, "Bearer a"),
        cache_key(CHAT, BODY, "Bearer b"),
        cache_key("/v1/completions", BODY, "Bearer a"),
        cache_key(CHAT, BODY, "Bearer a", variant="gzip"),
    }
    # No Authorization and an empty one are the same partition; everything else differs.
    assert len(keys) == 5


def test_parts_are_framed() -> None:
    # Moving bytes between the path and the variant must not give the same key.
    assert cache_key("/ab", BODY, None, variant="c") != cache_key("/a", BODY, None, variant="bc")


def test_huge_integers_still_give_a_key() -> None:
    assert cache_key(CHAT, {"seed": 2**70}, None) != cache_key(CHAT, {"seed": 2**70 + 1}, None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=10,
)


@given(json_values)
def test_key_survives_a_json_round_trip(value: object) -> None:
    again = json.loads(json.dumps(value, indent=2, sort_keys=False))
    assert cache_key(CHAT, again, "x") == cache_key(CHAT, value, "x")


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (True, True)),
        ("", (True, True)),
        ("no-cache", (False, True)),
        ("No-Cache", (False, True)),
        ("no-store", (False, False)),
        ("NO-STORE, no-cache", (False, False)),
        ("no-cache, no-store", (False, False)),
        ("max-age=0", (False, True)),
        ('max-age="0"', (False, True)),
        ("max-age=60", (True, True)),
        ("private, community=\"no-store, x\"", (True, True)),
        ("only-if-cached", (True, True)),
        (" , ,no-cache , ", (False, True)),
        ("no-cache=\"set-cookie\"", (False, True)),
    ],
)
def test_request_cache_policy(header: str | None, expected: tuple[bool, bool]) -> None:
    assert request_cache_policy(header) == expected


# ----------------------------------------------------------------------------- entries


def test_entry_round_trip_and_size() -> None:
    entry = CachedResponse(200, (("Content-Type", "text/event-stream"),), b"data: x\n\n", 1234.5, True)
    assert CachedResponse.decode(entry.encode()) == entry
    assert entry.size == len(b"data: x\n\n") + len("Content-Type") + len("text/event-stream") + 4
    assert "stream" in repr(entry)


@given(
    st.integers(100, 599),
    st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=8)), max_size=4),
    st.binary(max_size=64),
    st.floats(0, 2e9),
    st.booleans(),
)
def test_entry_round_trip_any(status: int, headers: list[tuple[str, str]], body: bytes, created: float,
                              streamed: bool) -> None:
    entry = CachedResponse(status, tuple(headers), body, created, streamed)
    assert CachedResponse.decode(entry.encode()) == entry


@pytest.mark.parametrize("raw", [b"", b"NXC1", b"NXC1\x00\x00\x00\x09[1,2]", b"pickle!", b"NXC1\x00\x00\x00\x02{}"])
def test_decode_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        CachedResponse.decode(raw)


def test_replayable_headers() -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=b"),
        ("Date", "Tue"),
        ("Server", "uvicorn"),
        ("X-Request-ID", "r1"),
        ("X-Cache", "MISS"),
        ("Proxy-Authenticate", "x"),
        ("x-ratelimit-remaining-requests", "9"),
        ("Content-Encoding", "gzip"),
        ("Cache-Control", "private"),
        ("OpenAI-Model", "m"),
    ]
    assert replayable_headers(headers) == (
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("Cache-Control", "private"),
        ("OpenAI-Model", "m"),
    )


# ----------------------------------------------------------------------------- credentials

KEYS = credential_keys()


def test_every_credential_header_partitions_and_none_is_its_own_partition() -> None:
    names = ["Authorization", "Proxy-Authorization", "X-Api-Key", "Api-Key", "Cookie",
             "OpenAI-Organization", "OpenAI-Project"]
    environs: list[dict[str, str]] = [{}]
    for name in names:
        env_name = "HTTP_" + name.upper().replace("-", "_")
        environs += [{env_name: "a"}, {env_name: "b"}]
    keys = [cache_key(CHAT, BODY, credentials(env, KEYS)) for env in environs]
    assert len(set(keys)) == len(environs)  # every header, every value, and none: all distinct
    assert credentials({}, KEYS) is None
    assert credentials({"HTTP_X_API_KEY": ""}, KEYS) is None  # an empty header is no credential
    assert cache_key(CHAT, BODY, credentials({"HTTP_COOKIE": "a"}, KEYS)) == keys[9]


def test_credentials_are_framed_so_that_values_cannot_be_shifted_between_headers() -> None:
    one = credentials({"HTTP_AUTHORIZATION": "x", "HTTP_X_API_KEY": "yz"}, KEYS)
    other = credentials({"HTTP_AUTHORIZATION": "xy", "HTTP_X_API_KEY": "z"}, KEYS)
    assert one != other
    assert cache_key(CHAT, BODY, one) != cache_key(CHAT, BODY, other)


def test_configured_partition_headers_are_added_once_in_a_fixed_order() -> None:
    keys = credential_keys(["X-Tenant", "authorization", " x-tenant "])
    assert keys[: len(KEYS)] == KEYS
    assert keys[len(KEYS):] == ("HTTP_X_TENANT",)
    assert credentials({"HTTP_X_TENANT": "t1"}, KEYS) is None
    a = cache_key(CHAT, BODY, credentials({"HTTP_X_TENANT": "t1"}, keys))
    b = cache_key(CHAT, BODY, credentials({"HTTP_X_TENANT": "t2"}, keys))
    assert a != b != cache_key(CHAT, BODY, None)


def test_no_credential_value_is_recoverable_from_the_key() -> None:
    secret = "sk-secret-value-0123456789"
    key = cache_key(CHAT, BODY, credentials({"HTTP_X_API_KEY": secret}, KEYS))
    assert secret not in key and len(key) == 32


def test_keys_are_the_same_across_versions() -> None:
    """Keys outlive a process: L2 on disk and the Redis tier shared by gateways of different
    versions. These were made by the first implementation (the parts fed to xxh3_128 in turn)."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert cache_key(CHAT, chat, None) == "a225b6a7c7afb17f412a4b15102cfe7f"
    assert cache_key(CHAT, chat, "") == "a225b6a7c7afb17f412a4b15102cfe7f"
    assert cache_key(CHAT, chat, "13:HTTP_X_API_KEY1:a") == "e6a05c0af417cc433db307fd8307f8fc"
    assert cache_key("/v1/embeddings", {"input": "é"}, None, variant="gzip") == "5263d694e08e0f6db3e119edef2a7711"


@given(st.text(), st.text(), st.one_of(st.none(), st.text()),
       st.dictionaries(st.text(), st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(), st.booleans())))
def test_the_key_is_xxh3_128_of_the_framed_parts(path: str, variant: str, credential: str | None,
                                                 body: dict[str, object]) -> None:
    import hashlib

    import xxhash

    h = xxhash.xxh3_128()
    h.update(hashlib.blake2b((credential or "").encode("utf-8", "surrogateescape"), digest_size=16).digest())
    for part in (path.encode("utf-8", "surrogateescape"), variant.encode("utf-8", "surrogateescape")):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    h.update(canonical_json(body))
    assert cache_key(path, body, credential, variant=variant) == h.hexdigest()
