"""LLM-aware routing through running gateways and mock backends (docs/routing.md, INTERFACE.md).

Model routing and 404, the gateway's ``GET /v1/models`` (configured and discovered, HUP),
``max_in_flight`` held host-wide under several workers, the queue timeout's 503, a policy change
on HUP with streams in flight, token accounting, and a conversation's turns staying on one
backend with ``prefix`` while load stays balanced.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections import Counter
from typing import Any

import pytest

from tests.live.procs import http, raw_exchange, wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory


def chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def entry(backend: MockBackend, **extra: Any) -> dict[str, Any]:
    return {"host": backend.host, "port": backend.port, "weight": 1, **extra}


def model_ids(gw: Gateway) -> list[str] | None:
    status, _, body = gw.request("GET", "/v1/models")
    if status != 200:
        return None
    doc = json.loads(body)
    assert doc["object"] == "list"
    return [m["id"] for m in doc["data"]]


def chats(backend: MockBackend) -> int:
    """Chat requests the backend received (discovery's GET /v1/models not counted)."""
    return int(backend.stats()["by_path"].get("/v1/chat/completions", 0))


def test_requests_go_only_to_backends_serving_their_model(gateway: GatewayFactory,
                                                          mock_backend: MockBackendFactory) -> None:
    a = mock_backend("a", extra_args=("--models", "m1"))
    b = mock_backend("b", extra_args=("--models", "m2"))
    gw = gateway([entry(a, models=["m1"]), entry(b, models=["m2"])], workers=2, config={"cache": {"enabled": False}})
    a.reset()
    b.reset()
    mix = ["m1", "m2", "m2", "m1", "m3", "m1"] * 8
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda ix: gw.request("POST", "/v1/chat/completions", chat(ix[1], f"q{ix[0]}")),
                                enumerate(mix)))
    for model, (status, headers, body) in zip(mix, answers, strict=True):
        if model == "m3":
            assert status == 404, body
            error = json.loads(body)["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
            assert "m3" in error["message"]
        else:
            assert status == 200, body
            assert headers["x-mock-instance"] == {"m1": "a", "m2": "b"}[model]
    assert chats(a) == mix.count("m1")
    assert chats(b) == mix.count("m2")
    # A request without a model, and one that is not JSON routing can read, go to any backend.
    assert gw.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})[0] == 200
    assert gw.request("GET", "/echo/any")[0] == 200


def test_other_openai_calls_route_by_model_and_count_their_tokens(gateway: GatewayFactory,
                                                                   mock_backend: MockBackendFactory) -> None:
    """Not only the cacheable paths: a JSON ``model`` routes any POST under /v1/ (here the
    Responses API), 404 when nobody serves it, and its answer's usage is counted."""
    a = mock_backend("a", extra_args=("--models", "m1"))
    b = mock_backend("b", extra_args=("--models", "m2"))
    gw = gateway([entry(a, models=["m1"]), entry(b, models=["m2"])], workers=2)
    for i in range(6):
        status, headers, body = gw.request("POST", "/v1/responses", {"model": "m2", "input": f"two words {i}"})
        assert status == 200, body
        assert headers["x-mock-instance"] == "b"
        assert headers["x-cache"] == "BYPASS"
    status, _, body = gw.request("POST", "/v1/responses", {"model": "zzz", "input": "x"})
    assert status == 404, body
    assert json.loads(body)["error"]["code"] == "model_not_found"
    # Not JSON, or no model: forwarded to any backend as before.
    assert gw.request("POST", "/echo/v1", b"not json", {"Content-Type": "application/json"})[0] == 200

    def tokens() -> Any:
        m = gw.metrics()
        return m if m["tokens"]["by_model"].get("m2", {}).get("completion") == 6 * 4 else None

    m = wait_until(tokens, timeout=10, what="the Responses API's tokens")
    assert m["tokens"]["by_model"]["m2"]["prompt"] == 6 * 3
    assert m["tokens"]["by_backend"][b.address]["completion"] == 24


def test_served_model_without_a_routable_backend_is_503(gateway: GatewayFactory,
                                                       mock_backend: MockBackendFactory) -> None:
    a = mock_backend("a")
    b = mock_backend("b")
    gw = gateway([entry(a, models=["m1"]), entry(b, models=["m2"])],
                 config={"health": {"interval_s": 0.2, "unhealthy_threshold": 1}})
    a.stop(quick=True)
    wait_until(lambda: gw.health()[1]["backends"]["healthy"] == 1, timeout=15, what="a marked unhealthy")
    status, headers, body = gw.request("POST", "/v1/chat/completions", chat("m1", "down"))
    assert status == 503, body
    assert int(headers["retry-after"]) >= 1
    assert gw.request("POST", "/v1/chat/completions", chat("m2", "up"))[0] == 200


def test_models_union_discovery_and_hup(gateway: GatewayFactory, mock_backend: MockBackendFactory) -> None:
    a = mock_backend("a", extra_args=("--models", "m1,shared"))
    b = mock_backend("b", extra_args=("--models", "m2,shared"))
    gw = gateway([a, b], workers=2)

    def union_is(expected: set[str]) -> bool:
        # Several answers in a row, so both workers have learnt it.
        for _ in range(6):
            ids = model_ids(gw)
            if ids is None or set(ids) != expected:
                return False
            assert len(ids) == len(set(ids))  # each id once
        return True

    wait_until(lambda: union_is({"m1", "m2", "shared"}), timeout=20, what="the discovered union")
    b.reset()
    assert gw.request("POST", "/v1/chat/completions", chat("m1", "to a"))[1]["x-mock-instance"] == "a"
    assert gw.request("POST", "/v1/chat/completions", chat("nope", "x"))[0] == 404
    assert chats(b) == 0

    # b now serves another model; a HUP has every worker ask again at once.
    b.stop(quick=True)  # restarted with other models: nothing to drain
    b.extra_args = ("--models", "m3")
    b.start()
    gw.reload()
    wait_until(lambda: union_is({"m1", "m3", "shared"}), timeout=20, what="the union after HUP")
    assert gw.request("POST", "/v1/chat/completions", chat("m2", "gone"))[0] == 404
    assert gw.request("POST", "/v1/chat/completions", chat("m3", "new"))[1]["x-mock-instance"] == "b"

    # A backend without a list (404 on /v1/models) serves any model: it joins every model's set,
    # and the union lists only the lists that are known.
    c = mock_backend("c")
    gw.set_backends([a, c])
    gw.reload()
    wait_until(lambda: union_is({"m1", "shared"}), timeout=20, what="the union without b")
    c.reset()
    assert gw.request("POST", "/v1/chat/completions", chat("anything", "x"))[1]["x-mock-instance"] == "c"


def test_models_forwarded_while_no_list_is_known(gateway: GatewayFactory, mock_backend: MockBackendFactory) -> None:
    a = mock_backend("a")  # no --models: 404 on /v1/models
    gw = gateway([a])
    a.reset()
    status, _, _ = gw.request("GET", "/v1/models")
    assert status == 404  # the backend's own answer, forwarded
    assert a.stats()["by_path"].get("/v1/models") == 1


def test_max_in_flight_holds_host_wide_under_four_workers(gateway: GatewayFactory,
                                                          mock_backend: MockBackendFactory) -> None:
    limit, clients = 3, 30
    a = mock_backend("a", ttft=0.25)
    gw = gateway([entry(a, max_in_flight=limit)], workers=4, config={"cache": {"enabled": False}})
    a.reset()
    seen: list[int] = []
    queued: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(a.stats()["active_requests"])
            m = gw.metrics()
            backend = m["backends"][0]
            assert backend["in_flight"] <= limit, backend
            queued.append(backend["queued"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda i: gw.request("POST", "/v1/chat/completions", chat("m", f"lim {i}"),
                                                         timeout=60)[0], range(clients)))
    finally:
        stop.set()
        watcher.join()
    assert answers == [200] * clients
    assert max(seen) == limit, seen  # reached, never exceeded
    assert max(queued) > 0
    assert chats(a) == clients
    wait_until(lambda: gw.metrics()["backends"][0]["in_flight"] == 0, timeout=10, what="every place given back")


def test_queue_timeout_is_503_with_retry_after(gateway: GatewayFactory, mock_backend: MockBackendFactory) -> None:
    a = mock_backend("a")
    gw = gateway([entry(a, max_in_flight=1)], workers=2,
                 config={"cache": {"enabled": False}, "routing": {"queue_timeout_s": 0.3}})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(gw.request, "POST", "/v1/chat/completions", chat("m", "slow"), {"X-Mock-TTFT": "3"})
        wait_until(lambda: gw.metrics()["backends"][0]["in_flight"] == 1, timeout=10, what="the slow request")
        started = time.monotonic()
        status, headers, body = gw.request("POST", "/v1/chat/completions", chat("m", "waits"))
        waited = time.monotonic() - started
        assert status == 503, body
        assert int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "backends_busy"
        assert 0.25 <= waited < 2.5
        assert slow.result(timeout=20)[0] == 200
    assert gw.request("POST", "/v1/chat/completions", chat("m", "after"))[0] == 200


@pytest.mark.parametrize("change", ["limit", "backend"])
def test_queued_requests_follow_a_hup_that_raises_their_limit_or_replaces_their_backend(
        gateway: GatewayFactory, mock_backend: MockBackendFactory, change: str) -> None:
    """Requests waiting for a place on a backend at its max_in_flight: a HUP that raises the
    limit lets them in at once; one that replaces the backend sends them to the new one at once
    (they waited out routing.queue_timeout_s and got 503 before)."""
    a, b = mock_backend("a"), mock_backend("b")
    gw = gateway([entry(a, max_in_flight=1)], workers=2,
                 config={"cache": {"enabled": False}, "routing": {"queue_timeout_s": 20}})

    def send(text: str, ttft: str = "0") -> tuple[int, float]:
        status, _, _ = gw.request("POST", "/v1/chat/completions", chat("m", text), {"X-Mock-TTFT": ttft}, timeout=40)
        return status, time.monotonic()

    def queued() -> int:
        return sum(int(x["queued"]) for x in gw.metrics()["backends"])

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = pool.submit(send, "hold", "8")
        wait_until(lambda: chats(a) >= 1, timeout=10, what="the slot held")
        waiting = [pool.submit(send, f"wait {i}") for i in range(2)]
        wait_until(lambda: queued() == 2, timeout=10, what="two requests queued")
        gw.write_config({"backends": [entry(a, max_in_flight=3) if change == "limit" else entry(b, max_in_flight=1)]})
        gw.reload()
        hup = time.monotonic()
        for w in waiting:
            status, at = w.result(timeout=30)
            assert status == 200
            assert at - hup < 4.0, f"answered {at - hup:.1f} s after the HUP (the slot is held for 8 s)"
        assert slow.result(timeout=30)[0] == 200
    assert (chats(a), chats(b)) == ((3, 0) if change == "limit" else (1, 2))


def _stream(gw: Gateway, text: str) -> tuple[int, bytes]:
    status, _, body = gw.request("POST", "/v1/chat/completions", chat("m", text, stream=True, max_tokens=12),
                                 {"X-Mock-Token-Delay": "0.1"}, timeout=30)
    return status, body


def test_policy_change_on_hup_with_streams_in_flight(gateway: GatewayFactory,
                                                     mock_backend: MockBackendFactory) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    gw = gateway([a, b], workers=2, config={"cache": {"enabled": False}})
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_stream, gw, f"s{i}") for i in range(6)]
        wait_until(lambda: sum(x["in_flight"] for x in gw.metrics()["backends"]) == 6, timeout=10,
                   what="six streams in flight")
        gw.write_config({"routing": {"policy": "least_requests"}})
        gw.reload()
        wait_until(lambda: "least_requests" in gw.output() or gw.output().count("config.reloaded") >= 2,
                   timeout=10, what="the reload")
        for s in streams:
            status, body = s.result(timeout=30)
            assert status == 200 and body.rstrip().endswith(b"data: [DONE]"), body[-200:]
    wait_until(lambda: all(x["in_flight"] == 0 for x in gw.metrics()["backends"]), timeout=10,
               what="places given back")
    # After the change: least_requests spreads concurrent requests over both backends.
    a.reset()
    b.reset()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: gw.request("POST", "/v1/chat/completions", chat("m", f"lr{i}"),
                                                   {"X-Mock-TTFT": "0.3"})[0], range(8)))
    assert codes == [200] * 8
    assert min(chats(a), chats(b)) >= 2


def test_token_metrics_for_json_streams_and_cache_hits(gateway: GatewayFactory,
                                                       mock_backend: MockBackendFactory) -> None:
    a = mock_backend("a")
    gw = gateway([a], workers=2)
    status, _, body = gw.request("POST", "/v1/chat/completions", chat("tm", "json answer", max_tokens=4),
                                 {"X-Mock-Cached-Tokens": "2"})
    assert status == 200
    usage = json.loads(body)["usage"]
    prompt = usage["prompt_tokens"]
    status, _, body = gw.request("POST", "/v1/chat/completions",
                                 chat("tm", "a streamed answer", max_tokens=5, stream=True,
                                      stream_options={"include_usage": True}))
    assert status == 200
    last = [json.loads(line[5:]) for line in body.decode().splitlines()
            if line.startswith("data: {") and '"usage"' in line][-1]["usage"]
    status, headers, _ = gw.request("POST", "/v1/chat/completions", chat("tm", "json answer", max_tokens=4),
                                    {"X-Mock-Cached-Tokens": "2"})
    assert (status, headers["x-cache"]) == (200, "HIT")

    def tokens() -> Any:
        m = gw.metrics()
        return m if m["cache_tokens_saved"]["completion"] else None

    m = wait_until(tokens, timeout=10, what="token figures")
    expected = {"prompt": prompt + last["prompt_tokens"], "completion": 4 + 5, "cached_prompt": 2}
    assert {k: m["tokens"][k] for k in expected} == expected
    assert m["tokens"]["by_backend"][a.address] == expected
    assert m["tokens"]["by_model"]["tm"] == expected
    assert {k: m["cache_tokens_saved"][k] for k in expected} == {"prompt": prompt, "completion": 4,
                                                                  "cached_prompt": 2}
    status, _, text = gw.request("GET", "/metrics?format=prometheus")
    lines = text.decode().splitlines()
    assert f'ntonix_tokens_total{{backend="{a.address}",kind="completion",model="tm"}} 9.0' in lines
    assert 'ntonix_cache_tokens_saved_total{kind="completion",model="tm"} 4.0' in lines
    assert f'ntonix_backend_in_flight{{backend="{a.address}"}} 0.0' in lines
    # The access log line of the hit carries the tokens it saved.
    # (The access log is written in batches: wait for the line.)
    def hit_line() -> Any:
        done = [json.loads(ln) for ln in gw.output().splitlines() if ln.startswith("{") and '"request.done"' in ln]
        return next((d for d in done if d.get("request_id") == headers["x-request-id"]), None)

    hit = wait_until(hit_line, timeout=5, what="the hit's access log line")
    assert (hit["model"], hit["completion_tokens"], hit["cached_tokens"], hit["cache"]) == ("tm", 4, 2, "HIT")


def test_a_backend_reporting_absurd_token_counts_does_not_break_the_metrics(gateway: GatewayFactory,
                                                                            mock_backend: MockBackendFactory) -> None:
    # Two answers of 2^63 - 1 prompt tokens summed past 64 bits: GET /metrics (JSON) answered 500
    # on every worker until a restart. A count no answer can have is not counted.
    a = mock_backend("a")
    gw = gateway([a], workers=2)
    absurd = json.dumps({"prompt_tokens": 2**63 - 1, "completion_tokens": 3})
    for i in range(4):
        status, _, _ = gw.request("POST", "/v1/chat/completions", chat("absurd", f"q{i}"),
                                  {"X-Mock-Usage": absurd, "Cache-Control": "no-store"})
        assert status == 200

    def counted() -> Any:
        m = gw.metrics()  # asserts a 200 JSON answer
        return m if m["tokens"]["completion"] == 12 else None

    m = wait_until(counted, timeout=10, what="the completion tokens of the four answers")
    assert (m["tokens"]["prompt"], m["tokens"]["by_model"]["absurd"]["prompt"]) == (0, 0)
    for _ in range(4):  # whichever worker answers
        assert gw.request("GET", "/metrics")[0] == 200


def test_a_stream_cut_after_its_usage_chunk_counts_its_tokens(gateway: GatewayFactory,
                                                              mock_backend: MockBackendFactory) -> None:
    # Three token events, the usage chunk, then the connection drops before [DONE]: the backend
    # did that work and said so.
    a = mock_backend("a")
    gw = gateway([a])
    payload = json.dumps(chat("cut", "a stream that breaks", max_tokens=3, stream=True,
                              stream_options={"include_usage": True})).encode()
    raw = raw_exchange(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                                b"Content-Type: application/json\r\nX-Mock-Break-After: 4\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    assert raw.startswith(b"HTTP/1.1 200") and b'"usage"' in raw and b"[DONE]" not in raw
    m = wait_until(lambda: (m := gw.metrics())["tokens"]["by_model"].get("cut") and m, timeout=10,
                   what="the cut stream's tokens")
    assert m["tokens"]["by_model"]["cut"]["completion"] == 3


def test_coalesced_followers_of_an_unsized_json_answer_count_the_tokens_they_saved(
        gateway: GatewayFactory, mock_backend: MockBackendFactory) -> None:
    # A JSON answer sent chunked (no Content-Length): its followers read it as JSON, not as
    # an event stream, and each one's tokens count as saved.
    a = mock_backend("a")
    gw = gateway([a], workers=2)
    body = chat("chunky", "one answer for six", max_tokens=4)
    headers = {"X-Mock-Chunked": "1", "X-Mock-TTFT": "1.0", "X-Mock-Cached-Tokens": "1"}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: gw.request("POST", "/v1/chat/completions", body, headers, timeout=30),
                                range(6)))
    assert chats(a) == 1
    hits = sum(h.get("x-cache") == "HIT" for _, h, _ in answers)
    assert hits == 5 and {b for _, _, b in answers} == {answers[0][2]}
    usage = json.loads(answers[0][2])["usage"]

    def saved() -> Any:
        m = gw.metrics()
        return m if m["cache_tokens_saved"]["completion"] == 4 * hits else None

    m = wait_until(saved, timeout=10, what="the tokens the five followers saved")
    assert m["cache_tokens_saved"]["by_model"]["chunky"] == {
        "prompt": hits * usage["prompt_tokens"], "completion": hits * 4, "cached_prompt": hits}


SYSTEM = "You are a careful assistant of the routing test. " * 12  # ~600 characters, shared by all


def _turn(gw: Gateway, history: list[dict[str, str]]) -> str:
    status, headers, body = gw.request("POST", "/v1/chat/completions",
                                       {"model": "m", "messages": list(history), "max_tokens": 3},
                                       {"X-Mock-TTFT": "0.4"}, timeout=30)
    assert status == 200, body
    return headers["x-mock-instance"]


def test_prefix_keeps_a_conversation_on_one_backend_with_load_balanced(gateway: GatewayFactory,
                                                                       mock_backend: MockBackendFactory) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    gw = gateway([a, b], workers=2, config={"cache": {"enabled": False}, "routing": {"policy": "prefix"}})
    users = 8
    histories = [[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": f"user {u} asks about the weather in town. " * 40}]
                 for u in range(users)]
    where: list[list[str]] = [[] for _ in range(users)]
    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        for rnd in range(4):
            # The users of a round arrive a little apart, all in flight together: each request
            # sees the others' places (host-wide, whichever worker took them).
            placed = []
            for u in range(users):
                placed.append(pool.submit(_turn, gw, histories[u]))
                time.sleep(0.05)
            for u, future in enumerate(placed):
                where[u].append(future.result(timeout=30))
                histories[u] += [{"role": "assistant", "content": f"answer {rnd} to user {u}"},
                                 {"role": "user", "content": f"round {rnd} question of user {u}. " * 10}]
    assert all(len(set(w)) == 1 for w in where), where  # every turn where the first one went
    per_backend = Counter(name for w in where for name in w)
    assert per_backend["a"] == per_backend["b"] == 16, per_backend

    # The same traffic under round_robin scatters the turns (what prefix avoids).
    gw.write_config({"routing": {"policy": "round_robin"}})
    gw.reload()
    wait_until(lambda: gw.output().count("config.reloaded") >= 2, timeout=10, what="the reload")
    # (Four turns each, the users side by side: with two workers, each with its own rotation,
    # two in a row may agree.)
    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        scattered = list(pool.map(lambda u: {_turn(gw, histories[u]) for _ in range(4)}, range(users)))
    assert any(len(s) == 2 for s in scattered), scattered


def test_least_requests_balances_concurrent_requests_over_two_workers(gateway: GatewayFactory,
                                                                      mock_backend: MockBackendFactory) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    gw = gateway([a, b], workers=2, config={"cache": {"enabled": False}, "routing": {"policy": "least_requests"}})
    a.reset()
    b.reset()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: http("POST", gw.url + "/v1/chat/completions", chat("m", f"b{i}"),
                                             {"X-Mock-TTFT": "0.4"})[0], range(16)))
    assert codes == [200] * 16
    counts = sorted([chats(a), chats(b)])
    assert counts[0] >= 6, counts
