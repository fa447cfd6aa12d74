"""Property-based tests (hypothesis) of the pure parts.

- configuration parsing: ``parse_backends`` reads back what was written and fails only with
  ``ConfigError``; ``build_config`` fails only with ``ConfigError`` naming the key, whatever it is
  given; a value given as environment text means what the same JSON value means; a valid
  configuration survives ``to_jsonable``/``from_jsonable``.
- cache keys: a body with the same meaning (key order, whitespace, escapes) gets the same key;
  any changed field, path or credential gets another. Bodies go through the gateway's own JSON
  parsing (``ntonix.gateway.proxy.parse_json_body``), as on the wire.
- header rewriting: ``X-Forwarded-For`` is only appended to, hop-by-hop headers never reach the
  backend, end-to-end headers pass unchanged, ``X-Request-ID`` never carries CR/LF.
"""

from __future__ import annotations

import json
import random
import re
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from ntonix.config import (
    SECTIONS,
    Config,
    ConfigError,
    build_config,
    env_layer,
    env_name,
    from_jsonable,
    leaf_keys,
    merge_layers,
    parse_backends,
    to_jsonable,
)
from ntonix.core.cache_key import cache_key
from ntonix.core.headers import (
    HOP_BY_HOP,
    client_ip,
    in_networks,
    parse_networks,
    request_id_from,
)
from ntonix.errors import BadRequest
from ntonix.gateway.proxy import origin_form, parse_json_body
from tests.header_forms import forward_request_headers

SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
BACKENDS = [{"host": "127.0.0.1", "port": 8001}]
# 150 examples each, unless a smaller profile is loaded (scripts/test --fast, tests/conftest.py).
_EXAMPLES = 150 if settings.default.max_examples >= 100 else settings.default.max_examples
PROPS = settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- strategies

hostnames = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?){0,3}",
                          fullmatch=True)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ip_any = st.ip_addresses().map(str)

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 2, max_value=2**66)
                | st.integers(min_value=-(2**66), max_value=-(2**63) + 2)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=6)

# RFC 9110 tchar, without "_" (gunicorn drops header names with underscores).
header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^`|~",
                       min_size=1, max_size=20)
# What gunicorn hands over as a value: no CR, LF or NUL, no surrounding whitespace.
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                        max_size=40).map(str.strip)


# ----------------------------------------------------------------------------- configuration


def _backend_text(host: str, port: int, weight: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" + ("" if weight is None else f":{weight}")


backend_items = st.tuples(hostnames | ipv4 | ipv6, st.integers(0, 99999), st.none() | st.integers(-5, 1000))


@PROPS
@given(items=st.lists(backend_items, min_size=1, max_size=6), pad=st.sampled_from(["", " ", "  "]),
       empties=st.integers(0, 2))
def test_parse_backends_reads_back_what_was_written(items: list[tuple[str, int, int | None]], pad: str,
                                                   empties: int) -> None:
    text = ",".join([f"{pad}{_backend_text(*item)}{pad}" for item in items] + [""] * empties)
    parsed = parse_backends(text)
    expected = [{"host": h, "port": p, **({} if w is None else {"weight": w})} for h, p, w in items]
    assert parsed == expected


@PROPS
@given(text=st.text(max_size=60))
def test_parse_backends_fails_only_with_a_config_error(text: str) -> None:
    try:
        parsed = parse_backends(text)
    except ConfigError as exc:
        assert str(exc).startswith("NTONIX_BACKENDS")
        return
    assert parsed and all(isinstance(b["port"], int) for b in parsed)


@PROPS
@given(items=st.lists(backend_items, min_size=1, max_size=4))
def test_backends_from_text_are_valid_or_the_error_names_the_backend(items: list[tuple[str, int, int | None]]) -> None:
    raw = {"backends": parse_backends(",".join(_backend_text(*item) for item in items))}
    try:
        cfg = build_config(raw, check_files=False)
    except ConfigError as exc:
        assert re.match(r"backends\[\d+\]", str(exc)), exc
        return
    assert [(b.host, b.port, b.weight) for b in cfg.backends] == [(h, p, 1 if w is None else w) for h, p, w in items]
    assert all(1 <= b.port <= 65535 and b.weight >= 1 for b in cfg.backends)


SCALAR_LEAVES = [(s, k, t) for s, k, t, _ in leaf_keys() if t in (bool, int, float, str)]
LIST_LEAVES = [(s, k, t) for s, k, t, _ in leaf_keys() if typing.get_origin(t) is tuple]


def _valid_value(typ: Any) -> st.SearchStrategy[Any]:
    if typ is bool:
        return st.booleans()
    if typ is int:
        return st.integers(-10, 70000)
    if typ is float:
        return st.floats(-5, 1e6, allow_nan=False) | st.integers(0, 100).map(float)
    if typ is str:
        return st.sampled_from(["", "info", "DEBUG", "json", "text", "/health", "x", "redis://r:6379/0"])
    return st.lists(st.sampled_from(["127.0.0.1/32", "10.0.0.0/8", "::1", "192.0.2.1", "fe80::/10", "nonsense"]),
                    max_size=3)


def _as_text(typ: Any, value: Any, rnd: random.Random) -> str:
    if typ is bool:
        word = rnd.choice(["true", "1", "yes", "on"] if value else ["false", "0", "no", "off"])
        return rnd.choice(["", " "]) + rnd.choice([word, word.upper()]) + rnd.choice(["", " "])
    if typ is float:
        return repr(value)
    if typ is int or typ is str:
        return str(value)
    return ",".join(value)


@st.composite
def overrides(draw: st.DrawFn) -> list[tuple[str, str, Any, Any]]:
    leaves = draw(st.lists(st.sampled_from(SCALAR_LEAVES + LIST_LEAVES), max_size=5, unique=True))
    return [(s, k, t, draw(_valid_value(t))) for s, k, t in leaves]


def _build(raw: dict[str, Any]) -> Config | str:
    try:
        return build_config(raw, check_files=False)
    except ConfigError as exc:
        return f"ConfigError at {str(exc).split(':')[0]}"


@PROPS
@given(changes=overrides(), rnd=st.randoms(use_true_random=False))
def test_environment_text_means_what_the_json_value_means(changes: list[tuple[str, str, Any, Any]],
                                                          rnd: random.Random) -> None:
    file_layer: dict[str, Any] = {"backends": BACKENDS}
    environ = {}
    for section, key, typ, value in changes:
        file_layer.setdefault(section, {})[key] = value
        environ[env_name(section, key)] = _as_text(typ, value, rnd)
    from_file = _build(file_layer)
    from_env = _build(merge_layers({"backends": BACKENDS}, env_layer(environ)))
    assert from_env == from_file


@PROPS
@given(changes=overrides())
def test_a_valid_configuration_survives_the_trip_to_the_workers(changes: list[tuple[str, str, Any, Any]]) -> None:
    raw: dict[str, Any] = {"backends": BACKENDS}
    for section, key, _, value in changes:
        raw.setdefault(section, {})[key] = value
    cfg = _build(raw)
    assume(isinstance(cfg, Config))
    assert isinstance(cfg, Config)
    again = from_jsonable(json.loads(json.dumps(to_jsonable(cfg))))
    assert again == cfg


@PROPS
@given(leaf=st.sampled_from(SCALAR_LEAVES + LIST_LEAVES), value=json_values)
def test_a_wrong_value_is_refused_naming_its_key(leaf: tuple[str, str, Any], value: Any) -> None:
    section, key, _ = leaf
    result = _build({"backends": BACKENDS, section: {key: value}})
    if isinstance(result, str):
        # The key itself, or (for a value that makes two keys disagree) a key of its section.
        assert result.startswith(f"ConfigError at {section}."), result


FLOAT_LEAVES = [(s, k) for s, k, t in SCALAR_LEAVES if t is float]


@PROPS
@given(leaf=st.sampled_from(FLOAT_LEAVES), text=st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999"]),
       big=st.integers(min_value=10**309, max_value=10**400))
def test_a_number_must_be_finite(leaf: tuple[str, str], text: str, big: int) -> None:
    section, key = leaf
    from_env = _build(merge_layers({"backends": BACKENDS}, env_layer({env_name(section, key): text})))
    assert from_env == f"ConfigError at {section}.{key}"
    assert _build({"backends": BACKENDS, section: {key: big}}) == f"ConfigError at {section}.{key}"
    assert _build({"backends": BACKENDS, section: {key: float(text)}}) == f"ConfigError at {section}.{key}"


@PROPS
@given(raw=st.dictionaries(st.sampled_from([*SECTIONS, "backends", "other"]), json_values, max_size=4))
def test_build_config_fails_only_with_a_config_error(raw: dict[str, Any]) -> None:
    result = _build(raw)
    assert isinstance(result, (Config, str))


# ----------------------------------------------------------------------------- cache keys


def _wire(body: Any, rnd: random.Random) -> bytes:
    """The same JSON value as another client might write it: key order, spacing, escapes."""
    def shuffle(value: Any) -> Any:
        if isinstance(value, dict):
            items = [(k, shuffle(v)) for k, v in value.items()]
            rnd.shuffle(items)
            return dict(items)
        if isinstance(value, list):
            return [shuffle(v) for v in value]
        return value
    indent = rnd.choice([None, 0, 2, "\t"])
    separators = rnd.choice([(",", ":"), (", ", ": "), (" ,", " : ")])
    return json.dumps(shuffle(body), indent=indent, separators=separators,
                      ensure_ascii=rnd.choice([True, False])).encode()


def key_of(path: str, wire: bytes, auth: str | None = None) -> str:
    return cache_key(path, parse_json_body(wire), auth)


CHAT = "/v1/chat/completions"


@PROPS
@given(body=json_objects, rnd=st.randoms(use_true_random=False))
def test_same_meaning_same_key(body: dict[str, Any], rnd: random.Random) -> None:
    assert key_of(CHAT, _wire(body, rnd)) == key_of(CHAT, _wire(body, rnd))


def _leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            paths += _leaf_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            paths += _leaf_paths(v, (*prefix, i))
    return paths


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    return [*value[:head], _replace(value[head], rest, new), *value[head + 1:]]


def _same(a: Any, b: Any) -> bool:
    """The same JSON value as written (1 and 1.0 and true are three values)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@PROPS
@given(body=json_objects, data=st.data(), rnd=st.randoms(use_true_random=False))
def test_any_changed_field_changes_the_key(body: dict[str, Any], data: st.DataObject, rnd: random.Random) -> None:
    paths = [p for p in _leaf_paths(body) if p]
    assume(paths)
    where = data.draw(st.sampled_from(paths))
    new = data.draw(json_values)
    changed = _replace(body, where, new)
    assume(not _same(changed, body))
    assert key_of(CHAT, _wire(changed, rnd)) != key_of(CHAT, _wire(body, rnd)), (where, new)


@PROPS
@given(body=json_objects, key=st.text(max_size=8), value=json_values, rnd=st.randoms(use_true_random=False))
def test_an_added_field_changes_the_key(body: dict[str, Any], key: str, value: Any, rnd: random.Random) -> None:
    assume(key not in body)
    assert key_of(CHAT, _wire({**body, key: value}, rnd)) != key_of(CHAT, _wire(body, rnd))


@pytest.mark.parametrize(("a", "b"), [(2**64, 2**64 + 1), (-(2**63) - 1, -(2**63) - 2), (10**30, 10**30 + 1)])
def test_integers_beyond_64_bits_keep_their_identity(a: int, b: int) -> None:
    # orjson reads such integers as floats, where 2**64 and 2**64 + 1 are the same number.
    assert key_of(CHAT, b'{"seed": %d}' % a) != key_of(CHAT, b'{"seed": %d}' % b)
    assert key_of(CHAT, b'{"seed": %d}' % a) == key_of(CHAT, b'{ "seed" : %d }' % a)


@PROPS
@given(body=json_objects, paths=st.lists(st.sampled_from(["/v1/chat/completions", "/v1/completions",
                                                          "/v1/embeddings"]), min_size=2, max_size=2, unique=True),
       auths=st.lists(st.none() | st.text(max_size=30), min_size=2, max_size=2, unique=True))
def test_path_and_credential_partition_the_key(body: dict[str, Any], paths: list[str],
                                               auths: list[str | None]) -> None:
    wire = json.dumps(body).encode()
    assert key_of(paths[0], wire) != key_of(paths[1], wire)
    if set(auths) != {None, ""}:  # no header and an empty one are the same partition
        assert key_of(CHAT, wire, auths[0]) != key_of(CHAT, wire, auths[1])


@PROPS
@given(wire=st.binary(max_size=200))
def test_any_body_bytes_give_a_key_or_a_400(wire: bytes) -> None:
    try:
        parsed = parse_json_body(wire)
    except BadRequest:
        return
    assert re.fullmatch(r"[0-9a-f]{32}", cache_key(CHAT, parsed, None))


# ----------------------------------------------------------------------------- header rewriting

OWN = frozenset({"host", "x-real-ip", "x-forwarded-proto", "x-request-id", "x-forwarded-for", "x-forwarded-host",
                 "content-length"})


@st.composite
def headers_lists(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Client headers, often with a Connection header that names some of them."""
    names = st.sampled_from([*sorted(HOP_BY_HOP), "X-Forwarded-For", "X-Real-IP", "X-Request-ID", "Host",
                             "Authorization", "Content-Type", "Content-Length"])
    headers = draw(st.lists(st.tuples(header_names | names, header_values), max_size=12))
    if draw(st.booleans()):
        pool = sorted({n for n, _ in headers} | {"X-Other", "Keep-Alive"})
        tokens = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
        spacing = draw(st.sampled_from([",", ", ", " , "]))
        headers.insert(draw(st.integers(0, len(headers))), ("Connection", spacing.join(tokens)))
    return headers


def _forward(headers: list[tuple[str, str]], remote: str, rid: str, trusted: Any = ()) -> tuple[
        list[tuple[str, str]], str]:
    return forward_request_headers(headers, remote_addr=remote, scheme="http", request_id=rid, trusted=trusted)


def _joined(headers: list[tuple[str, str]], name: str) -> str | None:
    values = [v for n, v in headers if n.lower() == name]
    return ",".join(values) if values else None


@PROPS
@example(headers=[("Connection", "Content-Type"), ("Content-Type", "text/plain")], remote="192.0.2.1", client_id=None)
@given(headers=headers_lists(), remote=ip_any, client_id=st.none() | st.text(max_size=200))
def test_forwarded_headers(headers: list[tuple[str, str]], remote: str, client_id: str | None) -> None:
    rid = request_id_from(client_id)
    out, real = _forward(headers, remote, rid)
    names = [n.lower() for n, _ in out]
    assert len(names) == len(set(names)), out
    got = dict((n.lower(), v) for n, v in out)

    # X-Forwarded-For: what the client sent, unchanged, then the peer.
    prior = _joined(headers, "x-forwarded-for")
    assert got["x-forwarded-for"] == (f"{prior}, {remote}" if prior else remote)
    # Nothing trusted: X-Real-IP is the socket peer.
    assert got["x-real-ip"] == real == remote

    # Hop-by-hop headers, and headers the client named in Connection, never go on.
    named = {t.strip().lower() for t in (_joined(headers, "connection") or "").split(",") if t.strip()}
    assert not (set(names) & ((HOP_BY_HOP | named) - OWN)), out

    # X-Request-ID: ours, sane, never CR/LF.
    assert got["x-request-id"] == rid and SANE_ID.fullmatch(rid)
    assert client_id is None or rid == client_id or not SANE_ID.fullmatch(client_id)

    # End-to-end headers pass unchanged (repeated ones joined, as WSGI does).
    for name in {n.lower() for n, _ in headers} - HOP_BY_HOP - named - OWN:
        if name == "content-type" and not _joined(headers, name):
            continue  # WSGI cannot tell an empty Content-Type from none
        assert got[name] == _joined(headers, name), name
    for _, value in out:
        assert "\r" not in value and "\n" not in value


@PROPS
@given(value=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_request_id_is_always_sane(value: str) -> None:
    rid = request_id_from(value)
    assert SANE_ID.fullmatch(rid), rid
    assert "\r" not in rid and "\n" not in rid and len(rid) <= 128
    if rid != value:
        assert request_id_from(value) != rid, "a replaced id is a fresh one each time"


@PROPS
@given(remote=ip_any, hops=st.lists(ip_any, max_size=5),
       nets=st.lists(st.sampled_from(["127.0.0.0/8", "10.0.0.0/8", "::1/128", "192.0.2.0/24", "fc00::/7"]),
                     max_size=3))
def test_real_ip_walks_only_past_trusted_proxies(remote: str, hops: list[str], nets: list[str]) -> None:
    trusted = parse_networks(nets)
    real = client_ip(remote, ", ".join(hops) or None, trusted)
    if not in_networks(remote, trusted):
        assert real == remote  # an untrusted peer's X-Forwarded-For is never believed
        return
    # The answer is an address of the chain with only trusted proxies to its right; it is
    # untrusted itself unless every address is trusted (then the leftmost one).
    chain = [*hops, remote]
    assert any(all(in_networks(h, trusted) for h in chain[i + 1:]) and (i == 0 or not in_networks(real, trusted))
               for i, h in enumerate(chain) if h == real), (real, chain)


PCHARS = "ABCXYZabcxyz0129._~%!$&'()*+,;=:@-"  # RFC 3986 pchar


@PROPS
@given(scheme=st.sampled_from(["http", "https", "HTTP"]), host=hostnames | ipv4 | ipv6.map(lambda a: f"[{a}]"),
       port=st.none() | st.integers(1, 65535),
       path=st.lists(st.text(alphabet=PCHARS, max_size=8), max_size=4).map(lambda segs: "".join("/" + s for s in segs)),
       query=st.none() | st.text(alphabet=PCHARS + "/?", max_size=16))
def test_absolute_form_targets_become_origin_form(scheme: str, host: str, port: int | None, path: str,
                                                  query: str | None) -> None:
    authority = host if port is None else f"{host}:{port}"
    target = f"{scheme}://{authority}{path}" + ("" if query is None else f"?{query}")
    expected = (path or "/") + ("" if query is None else f"?{query}")
    assert origin_form(target) == expected
