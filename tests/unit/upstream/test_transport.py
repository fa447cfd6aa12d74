"""The per-backend keep-alive pool (ntonix.upstream.transport.Pool) against a real loopback listener.

No gateway process: a gevent StreamServer plays the backend, the clock is a fake.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from gevent.server import StreamServer

from ntonix.upstream import transport
from tests.fakes import FakeClock

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
PARTIAL = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok"




@pytest.fixture
def backend() -> Iterator[Any]:
    accepted: list[Any] = []

    def handle(sock: Any, _addr: Any) -> None:
        accepted.append(sock)
        buf = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    # /partial: announce 10 bytes, send 2 and keep the connection open
                    sock.sendall(PARTIAL if head.startswith(b"GET /partial") else RESPONSE)
        except OSError:
            return

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    server.accepted = accepted  # type: ignore[attr-defined]
    yield server
    for pool in _POOLS:
        pool.close()
    _POOLS.clear()
    for sock in accepted:
        sock.close()
    server.stop(timeout=1)


_POOLS: list[transport.Pool] = []


def _pool(server: Any, clock: FakeClock, size: int = 2, max_size: int = 4) -> transport.Pool:
    pool = transport.Pool("127.0.0.1", server.server_port, size=size, max_size=max_size, idle_timeout_s=10.0,
                          connect_timeout_s=1.0, clock=clock)
    _POOLS.append(pool)
    return pool


def _get(pool: transport.Pool) -> bytes:
    resp = transport.send(pool, "GET", "/", [("Host", "x")], b"", 2.0)
    body = b""
    while chunk := transport.read_some(resp):
        body += chunk
    return body


def test_connections_are_reused_when_the_response_was_read_to_its_end(backend: Any) -> None:
    pool = _pool(backend, FakeClock())
    for _ in range(5):
        assert _get(pool) == b"ok"
    assert len(backend.accepted) == 1
    assert (pool.active, pool.idle) == (0, 1)


def test_a_response_not_read_to_its_end_is_closed_not_pooled(backend: Any) -> None:
    pool = _pool(backend, FakeClock())
    resp = transport.send(pool, "GET", "/partial", [("Host", "x")], b"", 2.0)
    assert transport.read_some(resp) == b"ok"
    assert pool.active == 1
    resp.release()  # we stop before the body ended (the client left)
    assert (pool.active, pool.idle) == (0, 0)
    assert _get(pool) == b"ok"
    assert len(backend.accepted) == 2


def test_pool_grows_to_max_size_and_shrinks_back_to_size_after_idle_timeout(backend: Any) -> None:
    clock = FakeClock()
    pool = _pool(backend, clock, size=2, max_size=4)
    held = [pool.acquire() for _ in range(4)]
    assert all(not reused for _, reused in held)
    with pytest.raises(transport.SendFailed):  # a fifth waits connect_timeout_s, then gives up
        pool.connect_timeout_s = 0.05
        pool.acquire()
    for sock, _ in held:
        pool.return_socket(sock)
    assert pool.idle == 4
    clock.advance(11.0)
    sock, reused = pool.acquire()  # expiry runs: idle beyond ``size`` closed, the rest kept warm
    assert reused
    pool.return_socket(sock)
    assert pool.idle == 2


def test_a_socket_the_backend_closed_while_idle_is_not_reused(backend: Any) -> None:
    clock = FakeClock()
    pool = _pool(backend, clock)
    assert _get(pool) == b"ok"
    for sock in backend.accepted:
        sock.close()
    gevent.sleep(0.05)
    clock.advance(5.0)  # old enough to be checked before reuse
    assert _get(pool) == b"ok"
    assert len(backend.accepted) == 2


def test_a_stale_keepalive_socket_is_retried_once_on_a_fresh_connection(backend: Any) -> None:
    clock = FakeClock()
    pool = _pool(backend, clock)
    assert _get(pool) == b"ok"
    for sock in backend.accepted:
        sock.close()
    gevent.sleep(0.05)  # fresh enough to skip the check: the send itself finds it closed
    assert _get(pool) == b"ok"


def test_connect_refused_is_send_failed() -> None:
    listener = StreamServer(("127.0.0.1", 0), lambda s, a: None)
    listener.start()
    port = listener.server_port
    listener.stop()
    pool = transport.Pool("127.0.0.1", port, size=1, max_size=1, idle_timeout_s=1, connect_timeout_s=1)
    with pytest.raises(transport.SendFailed):
        pool.acquire()
    assert pool.active == 0


def test_closed_pool_refuses_new_requests_and_closes_returned_sockets(backend: Any) -> None:
    pool = _pool(backend, FakeClock())
    sock, _ = pool.acquire()
    pool.close()
    pool.return_socket(sock)
    assert pool.idle == 0
    with pytest.raises(transport.SendFailed):
        pool.acquire()
