"""ntonix.routing.state: the routing state built from a configuration and changed on HUP."""

from __future__ import annotations

from pathlib import Path

from ntonix.config import build_config
from ntonix.routing.state import RoutingState

BACKENDS = [{"host": "127.0.0.1", "port": 8001, "max_in_flight": 2}, {"host": "127.0.0.1", "port": 8002, "weight": 3}]


def config(**routing: object) -> object:
    return build_config({"server": {"ssl_port": 0}, "backends": BACKENDS, "routing": routing}, check_files=False)


def test_built_from_config_and_changed_on_hup(tmp_path: Path) -> None:
    state = RoutingState(config(), str(tmp_path))  # type: ignore[arg-type]
    assert state.selector.router.policy == "round_robin"
    assert state.targets["127.0.0.1:8001"].max_in_flight == 2
    assert state.targets["127.0.0.1:8002"].weight == 3
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 1000}]}
    assert state.blocks(body, b"k") == []  # no hashing unless the policy needs it
    lease = state.selector.acquire(list(state.targets.values()))
    state.apply(config(policy="prefix", queue_timeout_s=3, prefix_block_chars=128))  # type: ignore[arg-type]
    assert state.selector.router.policy == "prefix"
    assert state.selector.queue_timeout_s == 3
    assert len(state.blocks(body, b"k")) == 1000 // 128
    assert state.selector.load.in_flight(lease.address) == 1  # a request in flight survives the change
    lease.release()
    assert (tmp_path / "routing-load").exists() and (tmp_path / "routing-index").exists()
    state.close()
