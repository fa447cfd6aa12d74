"""The join and finish commands of ntonix/cluster/flights.py, framed from a process's constant
parts (resp.py ``Encoded``), are byte for byte what the generic encoder makes of the scripts'
arguments (lua.py JOIN, FINISH), for any keys, answers and settings; no Redis involved."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ntonix.cluster.flights import Flights, _Ending, _finish_call
from ntonix.cluster.lua import SHAS
from ntonix.cluster.resp import encode, encode_many

_KEY = st.one_of(st.text(alphabet="0123456789abcdef", min_size=1, max_size=40), st.text(min_size=1, max_size=20))
_PREFIX = st.sampled_from(["ntonix:flight:", "gw:", "né:"])


def _flights(prefix: str, lease_s: float, grace_s: float) -> Flights:
    f = Flights("redis://127.0.0.1:9/0", prefix=prefix, lease_s=lease_s, grace_s=grace_s)
    f._proc = "0a1b2c3d4e5f"  # as _ready sets it (no connection is made here)
    return f


@given(_PREFIX, _KEY, st.booleans(), st.sampled_from([0.3, 1.0, 2.5]))
def test_the_join_is_framed_as_its_arguments_encode(prefix: str, key: str, cached: bool, lease_s: float) -> None:
    f = _flights(prefix, lease_s, 60)
    token = f._proc + "1f"
    value = f"{token} {f._proc}"
    cache_key = "ntonix:cache:" + key if cached else None
    keys = [prefix + "k:" + key, prefix + "f:" + token, prefix + "a:" + f._proc] + ([cache_key] if cache_key else [])
    expected = encode("EVALSHA", SHAS["join"], len(keys), *keys, value, int(lease_s * 1000), f.flight_ttl_ms, prefix)
    assert encode_many([f._join_command(key, token, value, cache_key)]) == expected


@given(_PREFIX, _KEY, st.sampled_from([0, 1]), st.one_of(st.none(), st.tuples(st.binary(max_size=64),
                                                                               st.integers(1, 10**9))),
       st.sampled_from([1.0, 60.0]))
def test_the_keepers_finish_is_framed_as_its_arguments_encode(prefix: str, key: str, ok: int,
                                                             answer: tuple[bytes, int] | None, grace_s: float) -> None:
    f = _flights(prefix, 1.0, grace_s)
    token = f._proc + "2a"
    value = f"{token} {f._proc}"
    keys = [prefix + "k:" + key, prefix + "f:" + token, prefix + "s:" + token]
    store = ("ntonix:cache:" + key, answer[0], answer[1]) if answer else None
    ending = _Ending(keys, value, ok, [], 0, store)
    args = [value, 0, ok, int(grace_s * 1000), *(store[1:] if store else ("", 0))]
    expected = encode("EVALSHA", SHAS["finish"], len(keys) + bool(store), *keys, *([store[0]] if store else []), *args)
    assert encode_many([f._finish_command(ending)]) == expected
    assert encode_many([_finish_call(keys, value, 0, ok, f.grace_ms, store)]) == expected
