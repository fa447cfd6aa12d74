"""The pure KV prefix-cache model of the mock's inference-server mode (mock_llm/kvcache.py)."""

from __future__ import annotations

import pytest

from mock_llm.inference import answer_tokens
from mock_llm.kvcache import PrefixCache, block_hashes, render_prompt, tokenize


def test_tokens_are_four_character_slices() -> None:
    assert tokenize("abcdefghij") == ["abcd", "efgh", "ij"]
    assert tokenize("") == []


def test_chat_template_makes_each_turn_a_prefix_of_the_next() -> None:
    turn1 = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}]
    first = render_prompt(True, {"messages": turn1})
    assert first == "<|system|>\nS\n<|user|>\nq1\n<|assistant|>\n"
    second = render_prompt(True, {"messages": [*turn1, {"role": "assistant", "content": "a1"},
                                               {"role": "user", "content": "q2"}]})
    assert second.startswith(first)
    assert render_prompt(False, {"prompt": "hello"}) == "hello"
    assert render_prompt(False, {"prompt": ["a", "b"]}) == "a\nb"


def test_block_hashes_are_chained_and_only_for_full_blocks() -> None:
    tokens = [f"t{i:02}" for i in range(10)]
    hashes = block_hashes(tokens, block_tokens=4)
    assert len(hashes) == 2  # the last 2 tokens make no full block
    assert block_hashes([*tokens[:8], "zz"], block_tokens=4) == hashes  # same prefix, same hashes
    changed = block_hashes(["xx", *tokens[1:]], block_tokens=4)
    assert changed[0] != hashes[0] and changed[1] != hashes[1]  # a change early changes every later hash
    same_block_elsewhere = block_hashes(tokens[4:8], block_tokens=4)
    assert same_block_elsewhere[0] != hashes[1]  # a block's hash depends on what came before


def test_cached_tokens_are_whole_leading_blocks_and_never_the_last_token() -> None:
    cache = PrefixCache(capacity_blocks=100, block_tokens=2)
    prompt = list("abcdefgh")  # 8 tokens, 4 full blocks
    assert cache.serve(prompt).cached_tokens == 0
    again = cache.serve(prompt)
    assert (again.prompt_tokens, again.cached_blocks, again.cached_tokens, again.computed_tokens) == (8, 3, 6, 2)
    longer = cache.serve([*prompt, "i", "j", "k"])
    assert longer.cached_tokens == 8
    assert cache.serve(["x", *prompt[1:]]).cached_tokens == 0  # a miss in block 0 hides the rest
    assert cache.lookup(list("ab")).cached_tokens == 0  # a one-block prompt: its last token is computed


def test_lookup_changes_nothing() -> None:
    cache = PrefixCache(capacity_blocks=10, block_tokens=2)
    assert cache.lookup(list("abcdef")).cached_tokens == 0
    assert len(cache) == 0


def test_least_recently_used_blocks_are_evicted_first() -> None:
    cache = PrefixCache(capacity_blocks=4, block_tokens=2)
    a, b, c = list("aaaa"), list("bbbb"), list("cccc")
    cache.serve([*a, "."])  # 2 blocks each
    cache.serve([*b, "."])
    cache.serve([*a, "."])  # a is now more recent than b
    cache.serve([*c, "."])  # evicts b's two blocks
    assert len(cache) == 4 and cache.evicted_blocks == 2
    assert cache.lookup([*a, "."]).cached_tokens == 4
    assert cache.lookup([*c, "."]).cached_tokens == 4
    assert cache.lookup([*b, "."]).cached_tokens == 0


def test_zero_capacity_caches_nothing_and_clear_empties() -> None:
    none = PrefixCache(capacity_blocks=0, block_tokens=2)
    none.serve(list("abcde"))
    assert none.serve(list("abcde")).cached_tokens == 0
    cache = PrefixCache(capacity_blocks=8, block_tokens=2)
    cache.serve(list("abcde"))
    cache.clear()
    assert len(cache) == 0 and cache.serve(list("abcde")).cached_tokens == 0
    with pytest.raises(ValueError):
        PrefixCache(capacity_blocks=1, block_tokens=0)


def test_answers_depend_on_the_prompt_only_and_are_four_characters_per_token() -> None:
    out = answer_tokens("prompt", 50)
    assert len(out) == 50 and all(len(t) == 4 and t[0] == " " for t in out)
    assert answer_tokens("prompt", 50) == out
    assert answer_tokens("prompt", 10) == out[:10]
    assert answer_tokens("other", 10) != out[:10]
    assert len(tokenize("".join(out))) == 50
