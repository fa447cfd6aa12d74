"""A coalesced leader whose own client leaves keeps the answer going for its followers."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

import pytest

from tests.live.procs import wait_until

pytestmark = pytest.mark.integration


def test_leader_client_leaving_does_not_cut_followers(mock_backend: Any, gateway: Any) -> None:
    backend = mock_backend("slow", token_delay=0.1)
    gw = gateway([backend], workers=2)
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": f"lead {time.time()}"}]})
    started = backend.stats()["streams_started"]

    leader = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    leader.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"X-Mock-Tokens: 12\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    assert b"data: " in leader.recv(65536) or b"data: " in leader.recv(65536)

    result: dict[str, Any] = {}

    def follow() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "X-Mock-Tokens": "12"})
        resp = conn.getresponse()
        result["cache"] = resp.getheader("X-Cache")
        result["body"] = resp.read()
        conn.close()

    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(0.3)  # the follower has joined the flight
    leader.close()  # the leader's client goes away mid-stream
    follower.join(timeout=20)

    assert result.get("cache") == "HIT"
    assert result["body"].count(b"data: ") == 13 and b"data: [DONE]" in result["body"]
    assert backend.stats()["streams_started"] - started == 1
    # The answer the leader finished in the background was stored: a later request is a hit.
    wait_until(lambda: gw.request("POST", "/v1/chat/completions", body.encode(), headers={
        "Content-Type": "application/json", "X-Mock-Tokens": "12"})[1].get("x-cache") == "HIT", timeout=5)
    assert backend.stats()["streams_started"] - started == 1
