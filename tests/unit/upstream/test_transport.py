"""The per-backend keep-alive pool (ntonix.upstream.transport.Pool) against a real loopback listener.

No gateway process: a gevent StreamServer plays the backend, the clock is a fake.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from gevent.server import StreamServer

from ntonix.upstream import transport
from tests.fakes import FakeClock

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
PARTIAL = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok"
ANSWERS = {
    b"/max2": b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=2\r\nContent-Length: 2\r\n\r\nok",
    b"/timeout1": b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1\r\nContent-Length: 2\r\n\r\nok",
    b"/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok",
}




@pytest.fixture
def backend() -> Iterator[Any]:
    accepted: list[Any] = []
    received: list[bytes] = []

    def handle(sock: Any, _addr: Any) -> None:
        accepted.append(sock)
        buf = b""
        served = 0  # requests answered on this connection
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    target = head.split(b" ")[1]
                    received.append(target)
                    if target in (b"/drop", b"/reset") and served:
                        # The keep-alive race: the backend closed this connection as our
                        # request arrived, too late for the pool's check to see it.
                        if target == b"/reset":
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        sock.close()
                        return
                    if target == b"/half":  # part of a status line, then gone
                        sock.sendall(b"HTTP/1.1 2")
                        sock.close()
                        return
                    served += 1
                    # /partial: announce 10 bytes, send 2 and keep the connection open
                    sock.sendall(PARTIAL if target == b"/partial" else ANSWERS.get(target, RESPONSE))
        except OSError:
            return

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    server.accepted = accepted  # type: ignore[attr-defined]
    server.received = received  # type: ignore[attr-defined]
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


def _get(pool: transport.Pool, path: str = "/") -> bytes:
    resp = transport.send(pool, "GET", path, [("Host", "x")], b"", 2.0)
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


def test_idle_connections_past_their_time_close_with_no_request_coming(backend: Any) -> None:
    # The audit: they were closed only by the next acquire, so a backend that got no more
    # requests kept max_size sockets per worker for good. The worker's loop calls expire_idle.
    clock = FakeClock()
    pool = _pool(backend, clock, size=1, max_size=3)
    held = [pool.acquire() for _ in range(3)]
    for sock, _ in held:
        pool.return_socket(sock)
    pool.expire_idle()
    assert pool.idle == 3  # not idle long enough yet
    clock.advance(11.0)
    pool.expire_idle()
    assert pool.idle == 1
    assert [sock.fileno() for sock, _ in held].count(-1) == 2  # closed, not just forgotten


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


def test_a_socket_the_backend_closed_right_after_answering_is_retried_on_a_fresh_one(backend: Any) -> None:
    pool = _pool(backend, FakeClock())
    assert _get(pool) == b"ok"
    for sock in backend.accepted:
        sock.close()
    gevent.sleep(0.05)  # no time passed on the pool's clock: reused without the poll (_TRUST_IDLE_S)
    assert _get(pool) == b"ok"  # the closed socket failed the request at once; a fresh one answered
    assert backend.received == [b"/", b"/"]  # the dead socket never handed the request to the backend
    assert len(backend.accepted) == 2


@pytest.mark.parametrize("path", ["/drop", "/reset"])
def test_a_reused_socket_closed_before_any_answer_byte_is_retried_on_a_fresh_one(backend: Any, path: str) -> None:
    pool = _pool(backend, FakeClock())
    held = [pool.acquire()[0] for _ in range(2)]
    for sock in held:  # two idle sockets that served a request: the retry must take neither
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100) == RESPONSE
    for sock in held:
        pool.return_socket(sock)
    assert _get(pool, path) == b"ok"
    assert backend.received == [b"/", b"/", path.encode(), path.encode()]
    assert len(backend.accepted) == 3  # the retry opened a connection of its own
    assert pool.idle == 2


def test_a_request_that_got_a_response_byte_is_never_resent(backend: Any) -> None:
    pool = _pool(backend, FakeClock())
    assert _get(pool) == b"ok"
    with pytest.raises(transport.UpstreamUnavailable) as info:
        _get(pool, "/half")
    assert not isinstance(info.value, transport.Unanswered)
    assert backend.received == [b"/", b"/half"]


def test_a_fresh_connection_closed_without_answer_is_unanswered_not_retried(backend: Any) -> None:
    pool = _pool(backend, FakeClock())
    with pytest.raises(transport.UpstreamUnavailable):
        _get(pool, "/half")
    assert backend.received == [b"/half"]


def test_keep_alive_max_is_honoured(backend: Any) -> None:
    pool = _pool(backend, FakeClock())
    for _ in range(5):
        assert _get(pool, "/max2") == b"ok"
    assert len(backend.accepted) == 3  # two requests per connection: 2 + 2 + 1
    assert pool.idle == 1


def test_connection_close_is_honoured(backend: Any) -> None:
    pool = _pool(backend, FakeClock())
    for _ in range(3):
        assert _get(pool, "/close") == b"ok"
        assert pool.idle == 0
    assert len(backend.accepted) == 3


def test_keep_alive_timeout_is_honoured_with_a_margin(backend: Any) -> None:
    clock = FakeClock()
    pool = _pool(backend, clock)
    assert _get(pool, "/timeout1") == b"ok"
    clock.advance(0.4)
    assert _get(pool, "/timeout1") == b"ok"
    assert len(backend.accepted) == 1
    clock.advance(0.6)  # past the announced second less the margin: not reused
    assert _get(pool, "/timeout1") == b"ok"
    assert len(backend.accepted) == 2


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


# ----------------------------------------------------------------------------- resolving

@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names resolved through gevent's resolver (its thread pool); a fresh address cache."""
    seen: list[str] = []
    real = gevent.socket.getaddrinfo

    def counting(host: str, *args: Any) -> Any:
        seen.append(host)
        gevent.sleep(0.01)  # a lookup takes a while: concurrent callers overlap
        return real("127.0.0.1", *args)

    monkeypatch.setattr(transport.gevent.socket, "getaddrinfo", counting)
    monkeypatch.setattr(transport, "_resolved", {})
    return seen


def test_a_numeric_backend_address_is_never_looked_up(backend: Any, lookups: list[str]) -> None:
    pool = _pool(backend, FakeClock())
    socks = [pool.acquire(fresh=True)[0] for _ in range(3)]
    assert len(backend.accepted) == 3
    assert lookups == []
    for sock in socks:
        pool.release_socket(sock)


def test_a_backend_name_is_looked_up_once_per_ttl_by_one_greenlet(lookups: list[str]) -> None:
    clock = FakeClock()
    group = [gevent.spawn(transport.addresses, "backend.test", 8001, clock) for _ in range(20)]
    gevent.joinall(group, raise_error=True)
    assert lookups == ["backend.test"]  # the other 19 took the first one's answer
    assert {g.value[0][3] for g in group} == {("127.0.0.1", 8001)}
    clock.advance(transport.RESOLVE_TTL_S - 0.1)
    transport.addresses("backend.test", 8001, clock)
    assert len(lookups) == 1
    clock.advance(0.2)  # past the TTL: a DNS change is seen
    transport.addresses("backend.test", 8001, clock)
    assert len(lookups) == 2


def test_a_failed_lookup_is_not_kept(lookups: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(host: str, *args: Any) -> Any:
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "unknown")

    monkeypatch.setattr(transport.gevent.socket, "getaddrinfo", failing)
    for _ in range(2):
        with pytest.raises(OSError):
            transport.connect("nowhere.test", 8001, 1.0)
    assert lookups == ["nowhere.test", "nowhere.test"]


@pytest.mark.parametrize(("reply", "expected"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"data\":[]}", (200, b'{"data":[]}')),
    (b"\x00\x01garbage that is not HTTP\r\n\r\n", (0, b"")),  # answered, with garbage: any model
    (b"", None),  # closed without a byte: unreachable, the last list stays
])
def test_fetch_models_tells_garbage_from_no_answer(reply: bytes, expected: Any) -> None:
    def handle(sock: socket.socket, _addr: Any) -> None:
        sock.recv(65536)
        if reply:
            sock.sendall(reply)
        sock.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        assert transport.fetch_models("127.0.0.1", server.server_port, 2.0) == expected
    finally:
        server.stop()
