"""The routing benchmark's workload: deterministic multi-turn conversations in prefix-sharing groups.

``Spec`` sizes it (defaults: 64 users in 8 groups, 1,024-token system prompts, 8 rounds, 64-token
questions and answers, a think time of 0-500 ms before each later turn). User ``u`` belongs to
group ``u % groups`` and shares that group's system prompt; round ``r`` sends the system prompt,
the user's first ``r`` questions with the answers they got, then question ``r``. So every turn's
prompt extends the previous turn's, and users of one group share the first ~1,024 tokens: the two
kinds of reuse an inference server's prefix cache serves, if the request lands where the prefix was computed.

All text is made of 4-character words (``" 3fa"``) from a seeded generator, so token counts are
exact under the mock's tokenizer (4 characters per token, mock_llm/kvcache.py), blocks of distinct
texts never collide, and the same ``Spec`` always yields the same bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from mock_llm.kvcache import block_hashes, render_prompt, tokenize

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class Spec:
    users: int = 64
    groups: int = 8
    system_tokens: int = 1024
    rounds: int = 8
    question_tokens: int = 64
    answer_tokens: int = 64
    seed: int = 1
    think_ms: int = 500  # a user pauses 0..think_ms before each turn after the first
    models: tuple[str, ...] = ()  # mixed traffic: user u asks models[u % len(models)]
    ignore_eos: bool = False  # real servers: every answer exactly answer_tokens long

    def __post_init__(self) -> None:
        for name in ("users", "groups", "rounds", "question_tokens", "answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("system_tokens", "think_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


# Real llama.cpp servers on a CPU (tools/routing_bench --real-llamacpp): SmolLM2's tokenizer makes
# a 4-character word about 4 tokens, so the last turn is about 190 + 4 × 40 tokens.
REAL = Spec(users=6, groups=2, system_tokens=48, rounds=4, question_tokens=8, answer_tokens=8, think_ms=200,
            ignore_eos=True)
QUICK = Spec(users=32, groups=4, system_tokens=512, rounds=4, question_tokens=32, answer_tokens=32, think_ms=200)


def words(rng: random.Random, tokens: int) -> str:
    """``tokens`` words of 4 characters: a space and 3 hex digits."""
    return "".join(f" {rng.getrandbits(12):03x}" for _ in range(tokens))


@dataclass(frozen=True, slots=True)
class Conversation:
    user: int
    group: int
    model: str
    system: str
    questions: tuple[str, ...]
    pauses: tuple[float, ...]  # seconds before each turn (the first: 0)

    def messages(self, answers: list[str]) -> list[Message]:
        """The next turn's messages, after ``len(answers)`` answered rounds."""
        out: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in zip(self.questions, answers, strict=False):
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"role": "user", "content": self.questions[len(answers)]})
        return out


def conversations(spec: Spec) -> list[Conversation]:
    systems = [words(random.Random(f"{spec.seed}:system:{g}"), spec.system_tokens) for g in range(spec.groups)]
    out = []
    for u in range(spec.users):
        rng = random.Random(f"{spec.seed}:user:{u}")
        questions = tuple(words(rng, spec.question_tokens) for _ in range(spec.rounds))
        # Users who all wait exactly for their answers would advance in lockstep, and a
        # round-robin proxy would then send each user to the same backend every turn by accident.
        pauses = (0.0, *(rng.randint(0, spec.think_ms) / 1000 for _ in range(spec.rounds - 1)))
        model = spec.models[u % len(spec.models)] if spec.models else "mock-model"
        out.append(Conversation(u, u % spec.groups, model, systems[u % spec.groups], questions, pauses))
    return out


def working_set_blocks(spec: Spec, block_tokens: int = 16) -> int:
    """Distinct KV blocks of every conversation's whole history (last prompt and last answer):
    what all backends together would need to hold for no prefix to be computed twice."""
    seen: set[bytes] = set()
    filler = " ..." * spec.answer_tokens  # answers' exact text does not change the count
    for conv in conversations(replace(spec, models=())):
        answers = [filler] * (spec.rounds - 1)
        final = [*conv.messages(answers), {"role": "assistant", "content": filler}]
        text = render_prompt(True, {"messages": final})
        seen.update(block_hashes(tokenize(text), block_tokens))
    return len(seen)


def total_prompt_tokens(spec: Spec) -> int:
    """Prompt tokens of all turns together (every answer ``answer_tokens`` long)."""
    filler = " ..." * spec.answer_tokens
    total = 0
    for conv in conversations(replace(spec, models=())):
        for r in range(spec.rounds):
            total += len(tokenize(render_prompt(True, {"messages": conv.messages([filler] * r)})))
    return total
