"""Replaying the workload against one target: concurrent users, streamed turns, mock counters.

One greenlet per user (the process is gevent-patched by tools/routing_bench/__main__.py) sends
its conversation's turns one after the other, each as soon as the previous answer is complete,
over its own keep-alive connection(s). Every turn is streamed with
``stream_options.include_usage`` so that the time to the first content event (TTFT) and the
backend's ``cached_tokens`` are both seen. A target is either a URL (nginx, the gateway) or a
client-side ``Router`` over the backends' URLs (direct round-robin, user hash, the reference).
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import gevent

from tools.routing_bench.procs import HOST, BenchBackend
from tools.routing_bench.routers import Router
from tools.routing_bench.stats import Row, Turn, summarize
from tools.routing_bench.workload import Conversation, Message, Spec

CHAT = "/v1/chat/completions"


@dataclass
class Target:
    label: str
    port: int | None = None  # a proxy on HOST:port
    router: Router | None = None  # or client-side routing over the backends
    # A new connection for every turn: behind a layer-4 balancer, a conversation's turns then land
    # on any of the gateways (one kept-alive connection would hold each user to one).
    reconnect: bool = False


def router_text(messages: Sequence[Message]) -> str:
    """What a router sees of a chat request: roles and contents in order (no tokenizer)."""
    return "".join(f"{m['role']}\n{m['content']}\n" for m in messages)


class _Client:
    """One user's keep-alive connections, one per port."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.conns: dict[int, http.client.HTTPConnection] = {}

    def conn(self, port: int) -> http.client.HTTPConnection:
        if port not in self.conns:
            self.conns[port] = http.client.HTTPConnection(HOST, port, timeout=self.timeout)
        return self.conns[port]

    def drop(self, port: int) -> None:
        conn = self.conns.pop(port, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for port in list(self.conns):
            self.drop(port)


def exchange(client: _Client, port: int, body: bytes, user: int, rnd: int) -> tuple[Turn, str]:
    """One streamed turn: the client's view of it and the answer text."""
    reused = port in client.conns
    turn, answer = _exchange_once(client, port, body, user, rnd)
    if reused and turn.status == 0 and turn.ttft is None and turn.error.startswith(_STALE):
        # A server may close a kept-alive connection after an answer (llama.cpp does after every
        # streamed one, see tests/integration/test_llamacpp.py): the request never reached it; a
        # fresh connection, as any HTTP client does for a reused one.
        turn, answer = _exchange_once(client, port, body, user, rnd)
    return turn, answer


_STALE = ("BrokenPipeError", "RemoteDisconnected", "ConnectionResetError")


def _exchange_once(client: _Client, port: int, body: bytes, user: int, rnd: int) -> tuple[Turn, str]:
    start = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    cached = 0
    try:
        conn = client.conn(port)
        conn.request("POST", CHAT, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read()[:200].decode("utf-8", "replace")
            return Turn(user, rnd, resp.status, None, time.perf_counter() - start, error=detail), ""
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    parts.append(content)
            if event.get("usage"):
                cached = int((event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        resp.read()  # the chunked terminator, so the connection can be reused
        return Turn(user, rnd, 200, ttft, time.perf_counter() - start, cached), "".join(parts)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        client.drop(port)
        return Turn(user, rnd, 0, ttft, time.perf_counter() - start, error=repr(exc)[:200]), ""


def converse(conv: Conversation, spec: Spec, target: Target, backends: Sequence[BenchBackend],
             delay: float, turns: list[Turn], timeout: float) -> None:
    gevent.sleep(delay)
    client = _Client(timeout)
    answers: list[str] = []
    suitable = [i for i, b in enumerate(backends) if b.serves(conv.model)] or list(range(len(backends)))
    try:
        for rnd in range(spec.rounds):
            gevent.sleep(conv.pauses[rnd])
            messages = conv.messages(answers)
            body = json.dumps({"model": conv.model, "messages": messages, "max_tokens": spec.answer_tokens,
                               "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                               **({"ignore_eos": True} if spec.ignore_eos else {})}).encode()
            if target.router is None:
                assert target.port is not None
                turn, answer = exchange(client, target.port, body, conv.user, rnd)
            else:
                index = target.router.pick(conv.user, router_text(messages), suitable)
                try:
                    turn, answer = exchange(client, backends[index].port, body, conv.user, rnd)
                finally:
                    target.router.done(index)
            if target.reconnect and target.port is not None:
                client.drop(target.port)
            turns.append(turn)
            answers.append(answer)
    finally:
        client.close()


def replay(target: Target, convs: Sequence[Conversation], spec: Spec, backends: Sequence[BenchBackend],
           stagger: float = 0.02, timeout: float = 300.0) -> Row:
    """Run every conversation against ``target`` from cold backend caches (``reset``; real servers were
    restarted before the target started); one table row."""
    for b in backends:
        b.reset()
    turns: list[Turn] = []
    start = time.perf_counter()
    users = [gevent.spawn(converse, conv, spec, target, backends, i * stagger, turns, timeout)
             for i, conv in enumerate(convs)]
    gevent.joinall(users, raise_error=True)
    seconds = time.perf_counter() - start
    return summarize(target.label, turns, [b.counts() for b in backends], seconds)
