"""ntonix/cluster/affinity.py's pure parts: summing the other gateways' load, a host's id."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from ntonix.cluster.affinity import AffinityBoard, host_id, remote_load


def test_remote_load_sums_the_hosts_per_backend_less_one() -> None:
    entries = [orjson.dumps({"x:1": 3, "y:1": 1}), orjson.dumps({"x:1": 2, "z:1": 1}), b'{"y:1": 1}']
    # x: 3 + 2 - 1; y: 1 + 1 - 1; z: 1 - 1 = 0, left out.
    assert remote_load(entries) == {"x:1": 4, "y:1": 1}
    assert remote_load([]) == {}


def test_remote_load_skips_what_it_cannot_read() -> None:
    entries = [b"not json", b"[1, 2]", orjson.dumps({"x:1": "many"}), orjson.dumps({"x:1": 5})]
    assert remote_load(entries) == {"x:1": 4}


def test_host_id_is_one_per_run_directory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = host_id(str(a))
    assert host_id(str(a)) == first  # every worker of the gateway: the same id
    assert host_id(str(b)) != first  # another gateway on the same machine: another one
    assert os.listdir(a) == ["cluster-host-id"]  # no temporary file left behind


def test_a_board_without_an_id_of_its_host_uses_its_own() -> None:
    board = AffinityBoard("redis://127.0.0.1:1/0")
    assert board.host == board.gateway
    assert AffinityBoard("redis://127.0.0.1:1/0", host="h1").host == "h1"
    assert board.remote == {} and board.stats["load_syncs"] == 0


def test_the_sync_loop_outlives_an_unexpected_error_and_ends_quietly_when_stopped(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    board = AffinityBoard("redis://127.0.0.1:1/0")
    calls: list[int] = []
    stop = [False]

    def sync() -> list[object]:
        calls.append(1)
        if len(calls) == 3:
            stop[0] = True  # closed under the call: its client went mid-read
        raise AttributeError("'NoneType' object has no attribute 'readline'")

    monkeypatch.setattr(board, "sync", sync)
    board.run(lambda got: None, 0.0, lambda s: None, lambda: stop[0])
    assert len(calls) == 3  # two failures logged and survived, the third ended the loop
    assert [r.message for r in caplog.records].count("cluster.affinity_sync_failed") == 2
