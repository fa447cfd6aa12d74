"""The mock's inference-server mode: a KV prefix cache, prefill and decode time, slots and a queue.

Theory of operation
-------------------
``python -m mock_llm --inference`` swaps the two completion views for ``Engine``'s, which act
like a one-GPU inference server (vLLM, SGLang, llama.cpp) as far as a router can tell:

1. **Admission.** At most ``max_num_seqs`` requests run at once; the others wait first come,
   first served (``FifoSlots``); with ``max_waiting`` > 0 a request that finds that many already
   waiting is refused at once with 503 (like vLLM's ``--max-num-queued-reqs``).
2. **Prefill.** The rendered prompt is tokenized and looked up in the LRU block cache
   (mock_llm/kvcache.py); its uncached tokens cost ``prefill_time_per_token`` each. Prefills run
   one at a time per instance (the accelerator is busy computing them), so uncached work queues
   up behind other uncached work: this is what a cache-aware router saves.
3. **Decode.** Each output token costs the ``token_delay`` setting (decode runs in parallel for
   all running requests); the first token comes out of the prefill, after the ``ttft`` setting.
   Streams send the first token at once, then one event per ``stream_interval`` tokens.
4. **Accounting.** ``usage`` has ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` and
   ``prompt_tokens_details.cached_tokens``; streams send it as a last chunk with no choices when
   ``stream_options.include_usage`` is true. ``GET /metrics`` has vLLM-style gauges and counters.

Answers are deterministic and do not depend on the instance: the text is a function of the
prompt only (``answer_tokens``), so a multi-turn workload replays the same conversation
whichever backend answered each turn. Waiting is ``time.sleep`` and ``threading`` objects, which
gunicorn's gevent worker has monkey-patched: hundreds of waiting requests cost no thread each.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, Response

from mock_llm.app import MockError, json_body
from mock_llm.kvcache import DEFAULT_BLOCK_TOKENS, Lookup, PrefixCache, render_prompt, tokenize

if TYPE_CHECKING:
    from mock_llm.app import MockLLM


@dataclass(frozen=True)
class InferenceConfig:
    """The ``--inference`` options (see ``python -m mock_llm --help``)."""

    kv_cache_tokens: int = 65536
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    prefill_time_per_token: float = 0.0001
    max_num_seqs: int = 8
    max_waiting: int = 0  # 0: no limit
    stream_interval: int = 1


class QueueFull(Exception):
    pass


class FifoSlots:
    """``slots`` holders at a time, the others served first come, first served."""

    def __init__(self, slots: int, max_waiting: int = 0) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.running = 0
        self._waiters: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def full(self) -> bool:
        """``acquire()`` would raise ``QueueFull``."""
        busy = self.running >= self.slots or bool(self._waiters)
        return busy and bool(self.max_waiting) and len(self._waiters) >= self.max_waiting

    def acquire(self) -> None:
        """Wait for a slot; ``QueueFull`` at once when ``max_waiting`` are already waiting."""
        with self._lock:
            if self.running < self.slots and not self._waiters:
                self.running += 1
                return
            if self.full():
                raise QueueFull
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # release() hands its slot over: ``running`` already counts us

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self.running -= 1


@dataclass
class Counters:
    requests: int = 0
    requests_finished: int = 0
    requests_rejected: int = 0  # queue full
    peak_in_system: int = 0  # most requests running and waiting at once (a proxy's concurrency limit)
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    blocks_running: int = 0  # full prompt blocks of running requests: vllm:kv_cache_usage_perc


def answer_tokens(prompt: str, count: int) -> list[str]:
    """``count`` tokens of 4 characters each (``" 1a2"``), a function of the prompt text only."""
    out: list[str] = []
    seed = hashlib.blake2b(prompt.encode(), digest_size=16).digest()
    n = 0
    while len(out) < count:
        hexes = hashlib.blake2b(seed + n.to_bytes(4, "big"), digest_size=32).hexdigest()
        out.extend(" " + hexes[i:i + 3] for i in range(0, 63, 3))
        n += 1
    return out[:count]


class Engine:
    """One instance's inference server: see the module docstring."""

    def __init__(self, mock: MockLLM, cfg: InferenceConfig) -> None:
        self.mock = mock
        self.cfg = cfg
        self.cache = PrefixCache(cfg.kv_cache_tokens // cfg.block_tokens, cfg.block_tokens)
        self.seqs = FifoSlots(cfg.max_num_seqs, cfg.max_waiting)
        self.compute = FifoSlots(1)
        self.counters = Counters()
        self.in_system = 0  # running or waiting

    def __repr__(self) -> str:
        return f"<Engine {self.mock.name} running={self.seqs.running} waiting={self.seqs.waiting} {self.cache!r}>"

    def reset(self) -> None:
        """``POST /_reset``: an empty cache and zero counters (what is running stays counted)."""
        self.cache.clear()
        self.counters = Counters(blocks_running=self.counters.blocks_running, peak_in_system=self.in_system)

    # -- views -----------------------------------------------------------------------------

    def chat_completions(self) -> Response:
        return self._complete(chat=True)

    def completions(self) -> Response:
        return self._complete(chat=False)

    def _complete(self, chat: bool) -> Response:
        mock = self.mock
        plan = mock._plan()
        body = json_body()
        model = mock.check_model(body)
        text = render_prompt(chat, body)
        tokens = tokenize(text)
        out = answer_tokens(text, mock._count(plan, body))
        self.counters.requests += 1
        try:
            if self.seqs.full():
                raise QueueFull
            self.in_system += 1  # no greenlet switch between the check and acquire()
            self.counters.peak_in_system = max(self.counters.peak_in_system, self.in_system)
            self.seqs.acquire()
        except QueueFull:
            self.counters.requests_rejected += 1
            raise MockError(503, f"{mock.name}: {self.seqs.waiting} requests waiting already "
                                 f"(--max-waiting {self.cfg.max_waiting})") from None
        blocks = len(tokens) // self.cfg.block_tokens
        self.counters.blocks_running += blocks
        done = _Once(self._finish, blocks)
        try:
            found = self._prefill(tokens)
            time.sleep(plan.ttft)
            rid = mock._next_id("chatcmpl" if chat else "cmpl")
            usage = {"prompt_tokens": len(tokens), "completion_tokens": len(out),
                     "total_tokens": len(tokens) + len(out),
                     "prompt_tokens_details": {"cached_tokens": found.cached_tokens}}
            created = int(time.time())
            if body.get("stream") is True:
                opts = body.get("stream_options")
                with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
                events = self._events(chat, rid, created, model, out, plan.token_delay, usage if with_usage else None)
                response = Response(_closing(events, done), mimetype="text/event-stream",
                                    headers={"Cache-Control": "no-cache"})
                response.call_on_close(done)
                return response
            time.sleep(plan.token_delay * max(len(out) - 1, 0))
            self.counters.generation_tokens += len(out)
            answer = "".join(out)
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                if chat else {"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"})
            done()
            return Response(json.dumps({
                "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice], "usage": usage, "mock_instance": mock.name,
            }), mimetype="application/json")
        except BaseException:
            done()
            raise

    def _prefill(self, tokens: list[str]) -> Lookup:
        """Hold the compute, charge the uncached tokens."""
        self.compute.acquire()
        try:
            found = self.cache.serve(tokens)
            c = self.counters
            c.prompt_tokens += found.prompt_tokens
            c.prompt_tokens_cached += found.cached_tokens
            c.prompt_tokens_computed += found.computed_tokens
            time.sleep(found.computed_tokens * self.cfg.prefill_time_per_token)
            return found
        finally:
            self.compute.release()

    def _finish(self, blocks: int = 0) -> None:
        self.in_system -= 1
        self.counters.blocks_running -= blocks
        self.counters.requests_finished += 1
        self.seqs.release()

    def _events(self, chat: bool, rid: str, created: int, model: Any, out: list[str], delay: float,
                usage: dict[str, Any] | None) -> Iterator[bytes]:
        step = max(self.cfg.stream_interval, 1)
        sent = 0
        yield b""  # headers now
        while sent < len(out):
            n = 1 if sent == 0 else min(step, len(out) - sent)
            if sent:
                time.sleep(delay * n)
            piece = "".join(out[sent:sent + n])
            last = sent + n == len(out)
            if chat:
                delta = {"role": "assistant", "content": piece} if sent == 0 else {"content": piece}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": "stop" if last else None}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": "stop" if last else None}
            event: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                     "created": created, "model": model, "choices": [choice]}
            if usage is not None:
                event["usage"] = None
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
            sent += n
            self.counters.generation_tokens += n
        if usage is not None:
            final: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model, "choices": [], "usage": usage}
            yield b"data: " + json.dumps(final).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    def metrics(self) -> Response:
        c, model = self.counters, self.mock.models[0] if self.mock.models else "mock-model"
        label = f'{{model_name="{model}"}}'
        usage = min(c.blocks_running / self.cache.capacity_blocks, 1.0) if self.cache.capacity_blocks else 0.0
        rows = [
            ("vllm:num_requests_running", "gauge", "Requests running (holding a sequence slot).", self.seqs.running),
            ("vllm:num_requests_waiting", "gauge", "Requests waiting for a sequence slot.", self.seqs.waiting),
            ("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV blocks held by running requests.", usage),
            ("vllm:prompt_tokens_total", "counter", "Prompt tokens, cached ones included.", c.prompt_tokens),
            ("vllm:generation_tokens_total", "counter", "Output tokens generated.", c.generation_tokens),
            ("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
             c.prompt_tokens),
            ("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
             c.prompt_tokens_cached),
            ("vllm:request_success_total", "counter", "Requests finished.", c.requests_finished),
            ("mock:requests_total", "counter", "Completion requests received for a served model.", c.requests),
            ("mock:requests_rejected_total", "counter", "Requests refused with 503: queue full.",
             c.requests_rejected),
            ("mock:requests_wrong_model_total", "counter", "Requests refused with 404: model not served.",
             self.mock.stats.wrong_model),
            ("mock:prompt_tokens_computed_total", "counter", "Prompt tokens prefilled (not cached).",
             c.prompt_tokens_computed),
            ("mock:prompt_tokens_cached_total", "counter", "Prompt tokens served from the prefix cache.",
             c.prompt_tokens_cached),
            ("mock:requests_in_system_peak", "gauge", "Most requests running and waiting at once since the reset.",
             c.peak_in_system),
            ("mock:kv_cache_blocks", "gauge", "Blocks held in the prefix cache.", len(self.cache)),
            ("mock:kv_cache_capacity_blocks", "gauge", "Capacity of the prefix cache in blocks.",
             self.cache.capacity_blocks),
        ]
        lines = []
        for name, kind, doc, value in rows:
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name}{label} {value}"]
        return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")


class _Once:
    """Call ``fn(*args)`` the first time only: the slot is released by whichever comes first,
    the end of the stream, the server closing the response, or an error."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn = fn
        self.args = args
        self.called = False

    def __call__(self) -> None:
        if not self.called:
            self.called = True
            self.fn(*self.args)


def _closing(events: Iterator[bytes], done: _Once) -> Iterator[bytes]:
    try:
        yield from events
    finally:
        done()


def install(app: Flask, mock: MockLLM, cfg: InferenceConfig) -> Engine:
    """Serve the completion views and ``/metrics`` from an ``Engine`` (``create_app`` calls it)."""
    engine = Engine(mock, cfg)
    app.view_functions["chat_completions"] = engine.chat_completions
    app.view_functions["completions"] = engine.completions
    app.add_url_rule("/metrics", view_func=engine.metrics, methods=["GET"])
    mock.reset_hooks.append(engine.reset)
    app.extensions["mock_llm_engine"] = engine
    return engine
