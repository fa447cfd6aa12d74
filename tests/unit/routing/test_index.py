"""ntonix.routing.index: the host-wide prefix index (one process here; the last test shares it with another)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ntonix.core.prompt import prompt_blocks
from ntonix.routing.index import PrefixIndex
from tests.fakes import FakeClock

ROOT = Path(__file__).resolve().parents[3]
SYSTEM = "You are a careful assistant who answers briefly. " * 30


def conversation(turns: int, user: str = "u1", model: str = "m") -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"{user} asks question {i}: " + "tell me more " * 40})
        messages.append({"role": "assistant", "content": f"answer {i} " * 60})
    messages.append({"role": "user", "content": f"{user} asks the last question"})
    return {"model": model, "messages": messages}


@pytest.fixture
def index(tmp_path: Path) -> PrefixIndex:
    return PrefixIndex(str(tmp_path / "index"), entries=4096, clock=FakeClock())


def test_the_next_turn_matches_everything_the_previous_one_sent(index: PrefixIndex) -> None:
    turn1 = prompt_blocks(conversation(1), block_chars=64)
    turn2 = prompt_blocks(conversation(2), block_chars=64)
    index.record(turn1, "a:1")
    got = index.matched(turn2, ["a:1", "b:2"])
    # turn 2 repeats turn 1's messages; only turn 1's last (user) message differs from what
    # turn 2 has in its place, so the match covers every block before the one holding it
    common = next((i for i, (x, y) in enumerate(zip(turn1, turn2, strict=False)) if x != y), len(turn1))
    assert got == {"a:1": common, "b:2": 0}
    assert common >= len(turn1) - 1
    index.record(turn2, "a:1")
    assert index.matched(prompt_blocks(conversation(3), block_chars=64), ["a:1"])["a:1"] >= len(turn2) - 1


def test_longest_match_per_backend(index: PrefixIndex) -> None:
    blocks = list(range(1, 41))
    index.record(blocks[:10], "a:1")
    index.record(blocks[:25], "b:2")
    index.record(blocks, "c:3")
    assert index.matched(blocks, ["a:1", "b:2", "c:3", "d:4"]) == {"a:1": 10, "b:2": 25, "c:3": 40, "d:4": 0}
    assert index.matched([], ["a:1"]) == {"a:1": 0}

    # Real prompts are chained: a different start changes every block, so nothing matches.
    index.record(prompt_blocks(conversation(2), block_chars=64), "a:1")
    other = conversation(2)
    other["messages"][0] = {"role": "system", "content": "Be terse. " + SYSTEM}
    assert index.matched(prompt_blocks(other, block_chars=64), ["a:1"]) == {"a:1": 0}


def test_models_and_tenants_do_not_share(index: PrefixIndex) -> None:
    index.record(prompt_blocks(conversation(1), block_chars=64), "a:1")
    assert index.matched(prompt_blocks(conversation(1, model="other"), block_chars=64), ["a:1"]) == {"a:1": 0}
    assert index.matched(prompt_blocks(conversation(1), partition=b"tenant-2", block_chars=64), ["a:1"]) == {"a:1": 0}


def test_shared_system_prompt_matches_for_another_user(index: PrefixIndex) -> None:
    index.record(prompt_blocks(conversation(0, user="u1"), block_chars=64), "a:1")
    other = prompt_blocks(conversation(0, user="u2"), block_chars=64)
    assert index.matched(other, ["a:1"])["a:1"] == (len(SYSTEM) + 8) // 64  # the system message's whole blocks


def test_memory_is_bounded_and_the_least_recently_seen_go_first(tmp_path: Path) -> None:
    clock = FakeClock()
    index = PrefixIndex(str(tmp_path / "index"), entries=1024, clock=clock)
    hot = list(range(1, 11))
    index.record(hot, "a:1")
    for round_ in range(20):  # 20 x 200 cold blocks through a table of 1024 entries
        clock.advance(1)
        index.record(hot, "a:1")  # seen again: stays
        index.record([10_000 * (round_ + 1) + i for i in range(200)], "b:2")
    assert index.matched(hot, ["a:1"]) == {"a:1": 10}
    assert index.matched([10_001 + i for i in range(200)], ["b:2"]) == {"b:2": 0}  # the oldest: gone
    recent = [200_000 + i for i in range(200)]
    assert index.matched(recent, ["b:2"])["b:2"] >= 150
    assert (tmp_path / "index").stat().st_size < 1024 * 24 + 8192


def test_known_blocks_are_refreshed_a_stride_at_a_time(tmp_path: Path) -> None:
    clock = FakeClock()
    index = PrefixIndex(str(tmp_path / "index"), entries=1024, clock=clock)
    history = list(range(1, 41))
    index.record(history, "a:1")
    for turn in range(8):  # the conversation goes on: its history is known, one new block a turn
        clock.advance(1)
        blocks = history + [1000 + i for i in range(turn + 1)]
        known = index.matched(blocks, ["a:1"])["a:1"]
        assert known == len(blocks) - 1
        index.record(blocks, "a:1", known=known)
    assert index.matched(blocks, ["a:1"]) == {"a:1": len(blocks)}
    # over REFRESH_STRIDE turns every history block was seen again (stamp after the first record)
    q, base = index._q, index._base  # entries are (key, mask, stamp) triples
    stamps = [q[base + 3 * e + 2] for e in range(1024) if 0 < q[base + 3 * e] <= 40]
    assert len(stamps) == 40
    assert min(stamps) >= (1000 + 1) * 1000


def test_forget_a_backend(index: PrefixIndex) -> None:
    blocks = list(range(1, 21))
    index.record(blocks, "a:1")
    index.record(blocks, "b:2")
    index.forget("a:1")
    assert index.matched(blocks, ["a:1", "b:2"]) == {"a:1": 0, "b:2": 20}
    assert "entries=4096" in repr(index)


def test_hash_zero_and_huge_hashes_are_keys_too(index: PrefixIndex) -> None:
    blocks = [0, 2**64 - 1, 2**63]
    index.record(blocks, "a:1")
    assert index.matched(blocks, ["a:1"]) == {"a:1": 3}


def test_workers_share_one_index(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    blocks = prompt_blocks(conversation(3), block_chars=64)
    child = ("import sys; from ntonix.routing.index import PrefixIndex; "
             "PrefixIndex(sys.argv[1], entries=4096).record([int(b) for b in sys.argv[2:]], 'b:2')")
    subprocess.run([sys.executable, "-c", child, path, *map(str, blocks)], cwd=ROOT, check=True, timeout=60)
    mine = PrefixIndex(path, entries=4096)
    assert mine.matched(blocks, ["a:1", "b:2"]) == {"a:1": 0, "b:2": len(blocks)}
