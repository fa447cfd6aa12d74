"""ntonix.gateway.endpoints: the gateway's own endpoints and the errors it renders, in one
process over a ScriptedTransport (tests/unit/gateway/flow.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ntonix.core.breaker import BreakerState
from ntonix.gateway.endpoints import Gateway
from ntonix.upstream.fake import Reply
from tests.unit.gateway.flow import B1, B2, Answer, ClientSocket, Flow, HostResponse, chat


def test_health_counts_the_eligible_backends(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, B2, circuit_breaker={"failure_threshold": 1})
    answer = flow.request("GET", "/health")
    assert (answer.status, answer.json()) == (200, {"status": "ok", "backends": {"healthy": 2, "total": 2}})
    assert answer.header("Cache-Control") == "no-store"
    assert answer.header("X-Cache") is None  # own endpoints are not cache answers
    for address in (B1, B2):
        flow.transport.script(address, Reply(fail="reset"))
        flow.request().read()
    assert flow.backend(B1).breaker.state is flow.backend(B2).breaker.state is BreakerState.OPEN
    answer = flow.request("GET", "/health")
    assert (answer.status, answer.json()) == (503, {"status": "unavailable", "backends": {"healthy": 0, "total": 2}})


def test_metrics_in_json_and_prometheus_text(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1)
    flow.transport.script(B1, Reply(200), Reply(fail="reset"))
    flow.request().read()
    flow.request().read()
    figures = flow.request("GET", "/metrics").json()
    assert figures["backends"] == [{**figures["backends"][0], "address": B1, "requests": 2, "errors": 1}]
    assert figures["responses"]["2xx"] == figures["responses"]["5xx"] == 1
    assert figures["requests_total"] == 3  # the two proxied and this one
    text = flow.request("GET", "/metrics", headers={"Accept": "text/plain"})
    assert text.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    assert b'ntonix_responses_total{status_class="5xx"} 1.0' in text.read()


def test_the_metrics_format_is_the_query_parameter_else_the_accept_header(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1)

    def kind(target: str, accept: str | None = None) -> str:
        path, _, query = target.partition("?")
        environ = flow.environ("GET", path, b"", {"Accept": accept} if accept else None)
        environ["QUERY_STRING"] = query
        answer = flow.call(environ)
        return "text" if answer.header("Content-Type").startswith("text/plain") else "json"

    assert kind("/metrics?format=prometheus") == kind("/metrics?format=PROMETHEUS") == "text"
    assert kind("/metrics", "TEXT/PLAIN") == kind("/metrics", "application/json;q=0.5, text/plain") == "text"
    assert kind("/metrics?format=json", "text/plain") == "json"
    # both listed: the higher q, else the first (Prometheus asks text/plain;q=0.5 among openmetrics)
    assert kind("/metrics", "application/json, text/plain") == "json"
    assert kind("/metrics", "text/plain;q=0.2, application/json") == "json"
    assert kind("/metrics", "text/plain, application/json") == "text"
    assert kind("/metrics", "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                            "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1") == "text"
    assert kind("/metrics", "text/plain;q=0") == kind("/metrics", "*/*") == "json"
    assert kind("/metrics?xformat=prometheus") == kind("/metrics?a=1&format=jsonx") == "json"


def test_metrics_and_cache_stats_only_from_allowed_addresses(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, metrics={"allow": ["10.0.0.0/8"]})
    for path in ("/metrics", "/cache/stats"):
        answer = flow.request("GET", path)
        assert answer.status == 403
        assert answer.json()["error"]["message"] == "this endpoint is not available from your address"
        environ = flow.environ("GET", path)
        environ["REMOTE_ADDR"] = "10.1.2.3"
        assert flow.call(environ).status == 200


def test_cache_stats_disabled_and_enabled(tmp_path: Path) -> None:
    off = Flow(tmp_path / "off", B1).request("GET", "/cache/stats").json()
    assert (off["enabled"], off["entries"], off["hits"], off["misses"]) == (False, 0, 0, 0)
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, Reply(200, chunks=[b"{}"]))
    flow.request().read()
    flow.request().read()
    stats = flow.request("GET", "/cache/stats").json()
    assert (stats["enabled"], stats["entries"], stats["hits"], stats["misses"], stats["hit_rate"]) == (
        True, 1, 1, 1, 0.5)


def test_cache_purge_needs_the_token(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    assert flow.request("POST", "/cache/purge", body=b"").status == 403  # no token configured
    flow = Flow(tmp_path / "t", B1, cache={"purge_token": "s3cret"})
    flow.transport.script(B1, Reply(200, chunks=[b"{}"]), Reply(200, chunks=[b"{}"]))
    flow.request().read()
    wrong = flow.request("POST", "/cache/purge", body=b"", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 403
    purged = flow.request("POST", "/cache/purge", body=b"", headers={"Authorization": "Bearer s3cret"})
    assert (purged.status, purged.json()) == (200, {"purged": 1})
    assert flow.request().header("X-Cache") == "MISS"


def test_every_request_is_reported_once(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1)
    flow.transport.script(B1, Reply(200), Reply(fail="reset"))
    answers = [flow.request(), flow.request(), flow.request("GET", "/health"), flow.request(body=b"{")]
    for answer in answers:
        answer.read()
        answer.close()
    assert [r.status for r in flow.telemetry.records] == [200, 502, 200, 400]


# ---------------------------------------------------------------------- errors, rendered once


def test_bad_json_is_a_400_in_openai_shape(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1)
    answer = flow.request(body=b"[1]", headers={"X-Request-ID": "abc"})
    assert answer.status == 400
    assert answer.json() == {"error": {"message": "request body must be a JSON object, got list",
                                       "type": "invalid_request_error", "code": "invalid_request"}}
    assert (answer.header("X-Request-ID"), answer.header("X-Cache")) == ("abc", "BYPASS")
    assert flow.transport.exchanges == []


@pytest.mark.parametrize(("model", "kind"), [(b"123", "int"), (b'["m"]', "list"), (b'{"id": "m"}', "dict")])
def test_a_model_that_is_not_a_string_is_a_400(tmp_path: Path, model: bytes, kind: str) -> None:
    # It was forwarded as a request naming no model, to any backend, which answered 404 itself.
    flow = Flow(tmp_path, B1)
    answer = flow.request(body=b'{"model": ' + model + b', "messages": []}')
    assert answer.status == 400
    assert answer.json()["error"]["message"] == f"'model' must be a string, got {kind}"
    assert flow.transport.exchanges == []
    flow.transport.script(B1, Reply(200), Reply(200))
    for body in (b'{"model": null, "messages": []}', b'{"messages": []}'):  # no model: any backend
        assert flow.request(body=body).status == 200


def test_a_body_over_the_limit_is_a_413_and_closes_the_connection(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, proxy={"max_body_bytes": 10})
    answer = flow.request(body=chat())
    assert (answer.status, answer.forced) == (413, True)  # the unread body must not be parsed as a request
    assert "over the limit of 10 bytes" in answer.json()["error"]["message"]
    small = flow.request(body=b"[]")
    assert (small.status, small.forced) == (400, False)


class SilentInput:
    def read(self, n: int = -1) -> bytes:
        raise TimeoutError


def test_a_client_that_stops_sending_its_body_gets_a_408(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, server={"body_timeout_s": 7})
    sock = ClientSocket()
    environ: dict[str, Any] = flow.environ(body=chat(), sock=sock)
    environ["wsgi.input"] = SilentInput()
    answer = flow.call(environ)
    assert (answer.status, answer.forced) == (408, True)
    assert sock.timeouts == [7, None]  # the socket's own timeout bounds each read, and is reset


@pytest.mark.parametrize(("method", "path"), [("POST", "/health"), ("GET", "/cache/purge"), ("GET", "/v1/models")])
def test_other_methods_and_paths_are_proxied(tmp_path: Path, method: str, path: str) -> None:
    flow = Flow(tmp_path, B1)
    flow.transport.script(B1, Reply(200, chunks=[b"ok"]))
    assert flow.request(method, path, b"").read() == b"ok"
    assert [(e.method, e.target) for e in flow.transport.exchanges] == [(method, path)]



def test_under_a_plain_wsgi_server_nothing_is_asked_of_the_host(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, proxy={"max_body_bytes": 10})
    plain = Gateway(flow.runtime)  # no host given: PlainHost
    sock = ClientSocket()
    host = HostResponse()
    answer = Answer(host, plain(flow.environ(body=chat(), sock=sock), host.start_response))  # type: ignore[arg-type]
    assert (answer.status, answer.forced, sock.timeouts) == (413, False, [])
    answer.read()
