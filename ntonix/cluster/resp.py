"""A minimal Redis (RESP2) client for the two calls every cache miss makes (ADR 0009).

Why not redis-py here: a command through redis-py costs about 30-40 µs of CPU (connection
pool bookkeeping, packing, a pure-Python parser), three times a raw round trip on the same
socket (tools/cluster_cost.py). A miss makes two calls (join, finish), and the issue's budget
for the whole cross-gateway path is 10 % of a miss (about 280 µs, docs/performance.md). The
rest of the protocol (followers, the keeper) stays on redis-py.

:func:`parse` is pure (bytes in, value out) and unit-tested; :class:`Pool` holds a few
connections per process with short timeouts, and drops any connection that failed.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import redis
from gevent.hub import Waiter, get_hub
from redis.backoff import NoBackoff
from redis.retry import Retry

from ntonix.core.redis_url import RedisAddress, parse_redis_url

Value = Any  # bytes | int | None | list[Value] | RespError (inside arrays)


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


class ProtocolError(Exception):
    """Bytes that are not RESP: the connection is dropped."""


# Everything a call to Redis may raise, through this client or redis-py: each means "Redis
# failed" to ntonix/cluster/ (a miss, a lone request), never an error for the client.
ERRORS = (redis.RedisError, OSError, RespError, ProtocolError, ValueError)


def redis_py(url: str, timeout_s: float, read_timeout_s: float | None = None) -> redis.Redis:
    """A redis-py client that fails fast: short timeouts, no retries, no health-check pings
    (the same settings as ntonix/cache/remote.py)."""
    return redis.Redis.from_url(url, socket_timeout=read_timeout_s or timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)


class Encoded:
    """A command already framed in RESP, sent as it is: for the calls every miss makes, put
    together from pieces the caller framed once (:func:`bulk`). The join's 11 arguments take
    1.0 µs so instead of 2.3 µs through :func:`encode` (measured apart, same run)."""

    __slots__ = ("parts",)

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts


def bulk(text: str) -> str:
    """One ASCII argument as a RESP bulk string (for ASCII, its length is its length in bytes)."""
    return f"${len(text)}\r\n{text}\r\n"


Command = tuple[bytes | str | int, ...] | Encoded


def encode(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    out: list[bytes] = []
    _encode_into(out, args)
    return b"".join(out)


def encode_many(commands: list[Command]) -> bytes:
    """Commands one after the other (a pipeline), joined once: a value (a cached answer) is
    copied once, into the result."""
    out: list[bytes] = []
    for args in commands:
        _encode_into(out, args)
    return b"".join(out)


def _encode_into(out: list[bytes], args: Command) -> None:
    if isinstance(args, Encoded):
        out.extend(args.parts)
        return
    # ASCII text and numbers (names, keys, tokens: nearly every argument) are framed as one
    # str and encoded once; bytes (an answer) and other text are added as they are, uncopied.
    # (1.5 instead of 2.1-2.4 µs for the join's 11 arguments.)
    text = [f"*{len(args)}\r\n"]
    for a in args:
        if isinstance(a, int):
            a = str(a)
        if isinstance(a, str) and a.isascii():
            text.append(f"${len(a)}\r\n{a}\r\n")
            continue
        b = a.encode() if isinstance(a, str) else a
        text.append(f"${len(b)}\r\n")
        out.append("".join(text).encode())
        out.append(b)
        text = ["\r\n"]
    out.append("".join(text).encode())


def parse(buf: bytes, pos: int = 0) -> tuple[Value, int] | None:
    """The reply starting at ``buf[pos]`` and the position after it, or ``None`` if ``buf``
    does not hold all of it yet. Error replies come back as :class:`RespError` values."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line = buf[pos:pos + 1], buf[pos + 1:end]
    nxt = end + 2
    if kind == b"+":
        return line, nxt
    if kind == b"-":
        return RespError(line.decode(errors="replace")), nxt
    if kind == b":":
        return int(line), nxt
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            return None
        return buf[nxt:nxt + n], nxt + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, nxt
        items: list[Value] = []
        for _ in range(n):
            got = parse(buf, nxt)
            if got is None:
                return None
            item, nxt = got
            items.append(item)
        return items, nxt
    raise ProtocolError(f"not a RESP reply: {buf[pos:pos + 16]!r}")


def sha1(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


def _connect(address: RedisAddress, timeout_s: float) -> socket.socket:
    """A socket to the Redis at ``address``: TCP, TCP with TLS (rediss://) or a Unix socket."""
    if address.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not address.tls:
        return sock
    context = ssl.create_default_context(cafile=address.ca_certs)
    if address.cert_reqs != "required":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL if address.cert_reqs == "optional" else ssl.CERT_NONE
    try:
        return context.wrap_socket(sock, server_hostname=address.host)
    except BaseException:
        sock.close()
        raise


class Connection:
    """One socket to Redis; every call sends one command and reads one reply."""

    def __init__(self, address: RedisAddress, timeout_s: float) -> None:
        self.sock = _connect(address, timeout_s)
        self._buf = b""
        username, password = address.username, address.password
        if password is not None:
            self.call(*(("AUTH", username, password) if username else ("AUTH", password)))
        if address.db:
            self.call("SELECT", address.db)

    def call(self, *args: bytes | str | int) -> Value:
        return self.send(args)

    def send(self, command: Command) -> Value:
        self.sock.sendall(encode_many([command]))
        while True:
            got = parse(self._buf) if self._buf else None
            if got is not None:
                value, used = got
                self._buf = self._buf[used:]
                if isinstance(value, RespError):
                    raise value
                return value
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("Redis closed the connection")
            self._buf += data

    def call_many(self, commands: list[Command]) -> list[Value]:
        """Pipelined: all commands in one write, then their replies (errors as values)."""
        self.sock.sendall(encode_many(commands))
        out: list[Value] = []
        while len(out) < len(commands):
            got = parse(self._buf) if self._buf else None
            if got is not None:
                value, used = got
                self._buf = self._buf[used:]
                out.append(value)
                continue
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("Redis closed the connection")
            self._buf += data
        return out

    def close(self) -> None:
        self.sock.close()


def evalsha(send: Callable[[Command], Value], script: str, command: Command) -> Value:
    """``command`` (an EVALSHA of ``script``) through ``send``, loading the script once if this
    Redis does not know it (e.g. restarted)."""
    try:
        return send(command)
    except RespError as exc:
        if not str(exc).startswith("NOSCRIPT"):
            raise
    send(("SCRIPT", "LOAD", script))
    return send(command)


class Pool:
    """Up to ``size`` idle connections to the Redis of ``url`` (ntonix/core/redis_url.py).

    ``size`` is about the misses in flight at once in a worker: with 16 at c = 500 most joins
    opened and closed a connection of their own (~5 % of a miss with Redis on, py-spy).

    A connection is taken for one call and given back only if the call succeeded, so a
    timed-out reply can never be read by the next caller.
    """

    def __init__(self, url: str, timeout_s: float, size: int = 128) -> None:
        self.address = parse_redis_url(url)
        self.timeout_s, self.size = timeout_s, size
        self._idle: list[Connection] = []
        self.closed = False

    def _take(self) -> Connection:
        return self._idle.pop() if self._idle else Connection(self.address, self.timeout_s)

    def pipeline(self, commands: list[Command]) -> list[Value]:
        """Several commands in one round trip; error replies come back as RespError values."""
        conn = self._take()
        try:
            values = conn.call_many(commands)
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)
        return values

    def call(self, *args: bytes | str | int) -> Value:
        return self.send(args)

    def send(self, command: Command) -> Value:
        conn = self._take()
        try:
            value = conn.send(command)
        except RespError:
            self._give_back(conn)  # an error reply leaves the connection in step
            raise
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)
        return value

    def _give_back(self, conn: Connection) -> None:
        if len(self._idle) < self.size and not self.closed:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        self.closed = True  # a call still under way closes its connection when it ends
        self.drop_idle()

    def drop_idle(self) -> None:
        """Close every idle connection: after a failure they are all suspect (a restarted
        Redis closed them), and each would fail once more when next taken."""
        while self._idle:
            self._idle.pop().close()


class _Failed:
    """What a waiter of :class:`AutoPipeline` gets when its call failed: raised by ``call``."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Line:
    """One connection of an :class:`AutoPipeline` and the callers waiting for its replies, in
    the order their commands were written, with when each was written."""

    __slots__ = ("buf", "conn", "reading", "sent", "waiting")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.waiting: deque[Waiter[Any]] = deque()
        self.sent: deque[float] = deque()
        self.reading = False
        self.buf = b""


class AutoPipeline:
    """The calls that a gevent worker's greenlets make in one turn of its event loop, sent to
    Redis in one write on one connection; one reader greenlet hands the replies back in order.

    Each caller blocks (its greenlet only) until its reply is in, as with :meth:`Pool.call`, but
    at a few hundred misses in flight the joins of a turn share one ``send`` and a few ``recv``
    instead of a send, a failed recv, a wait on the socket and a recv each (the cross-gateway
    path's largest cost, py-spy: ~12 % of a miss at c = 500). Used only inside gevent workers
    (ntonix/gateway/runtime.py ``start``); elsewhere callers use :class:`Pool` directly.

    The write is a callback of the event loop, after the greenlets ready in this turn have run:
    a non-blocking ``send`` of everything queued (a greenlet finishes it only when the socket
    takes less, or a connection must be opened). The reader stays while replies are due and
    for ``timeout_s`` after, so a steady stream of calls does not start one per batch.

    A failure (connect, write, a reply later than the pool's ``timeout_s``, a closed socket)
    fails every call waiting on that connection with the error and drops the connection; the
    next call opens a new one. Error replies (``-ERR``) fail only their own call.
    """

    def __init__(self, pool: Pool, spawn: Callable[..., object] = gevent.spawn,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool, self._spawn, self._clock = pool, spawn, clock
        self._line: _Line | None = None
        self._out: list[bytes] = []
        self._queued: list[Waiter[Any]] = []
        self._rest: memoryview | None = None  # the part of a write the socket did not take at once
        self._writing = False
        self.batches = 0  # writes sent (for tests and figures): calls / batches = calls per write

    def call(self, *args: bytes | str | int) -> Value:
        return self.send(args)

    def send(self, command: Command) -> Value:
        if self.pool.closed:
            raise ConnectionError("Redis pool closed")
        waiter: Waiter[Any] = Waiter()
        parts: list[bytes] = []
        _encode_into(parts, command)  # first: a command that fails to encode leaves _out whole
        self._out += parts
        self._queued.append(waiter)
        if not self._writing:
            self._writing = True
            get_hub().loop.run_callback(self._flush)  # once the greenlets ready now have yielded
        value = waiter.get()
        if isinstance(value, _Failed):
            raise value.exc
        if isinstance(value, RespError):
            raise value
        return value

    def close(self) -> None:
        line, self._line = self._line, None
        if line is not None:
            self._kill(line, ConnectionError("Redis pool closed"))

    def drop_idle(self) -> None:
        """Close the connection if no reply is due on it (after a failure elsewhere it is as
        suspect as the pool's idle ones); the next call opens a new one."""
        line = self._line
        if line is not None and not line.waiting and not self._writing and self._rest is None and not self._out:
            self._line = None
            line.conn.close()

    def _take(self, line: _Line) -> bytes:
        """What was queued, now due on ``line``."""
        out, self._out = self._out, []
        batch, self._queued = self._queued, []
        line.waiting.extend(batch)
        line.sent.extend([self._clock()] * len(batch))
        self.batches += 1
        return b"".join(out)

    def _flush(self) -> None:
        """In the event loop: the queued calls in one non-blocking send, when that is enough."""
        line = self._line
        # gevent's socket wraps a non-blocking one (``_sock``), which the loop may send on.
        raw = getattr(line.conn.sock, "_sock", None) if line is not None else None
        if line is None or raw is None or self._rest is not None:
            self._spawn(self._write)
            return
        data = self._take(line)
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._writing = False
            self._kill(line, exc)
            return
        if sent < len(data):
            self._rest = memoryview(data)[sent:]
            self._spawn(self._write)  # finishes it, and sends what is queued meanwhile
            return
        self._writing = False
        self._reader(line)

    def _write(self) -> None:
        """In a greenlet: what may block (a connection to open, a socket that takes less)."""
        try:
            rest, self._rest = self._rest, None
            while rest is not None or self._out:
                line = self._line
                try:
                    if rest is not None:
                        if line is not None:  # else it failed meanwhile: its callers know
                            line.conn.sock.sendall(rest)
                        rest = None
                        continue
                    if line is None:
                        line = self._line = _Line(Connection(self.pool.address, self.pool.timeout_s))
                    line.conn.sock.sendall(self._take(line))
                except ERRORS as exc:
                    rest = None
                    if line is None:
                        batch, self._out, self._queued = self._queued, [], []
                        _wake(batch, _Failed(exc))
                    else:
                        self._kill(line, exc)
                    continue
                self._reader(line)
        finally:
            self._writing = False

    def _reader(self, line: _Line) -> None:
        if not line.reading:
            line.reading = True
            self._spawn(self._read, line)

    def _read(self, line: _Line) -> None:
        timeout_s = self.pool.timeout_s
        try:
            while True:
                try:
                    data = line.conn.sock.recv(65536)  # the socket's timeout is timeout_s
                except TimeoutError:
                    if not line.waiting:
                        return  # idle for timeout_s: the next batch starts a reader again
                    if self._clock() - line.sent[0] >= timeout_s:
                        raise
                    continue
                if not data:
                    raise ConnectionError("Redis closed the connection")
                buf, pos = line.buf + data, 0
                while line.waiting:
                    got = parse(buf, pos)
                    if got is None:
                        break
                    value, pos = got
                    line.sent.popleft()
                    _wake([line.waiting.popleft()], value)
                line.buf = buf[pos:]
        except ERRORS as exc:
            self._kill(line, exc)
        finally:
            line.reading = False

    def _kill(self, line: _Line, exc: BaseException) -> None:
        if self._line is line:
            self._line = None
        waiting, line.waiting, line.sent = list(line.waiting), deque(), deque()
        _wake(waiting, _Failed(exc))
        line.conn.close()


def _wake(waiters: list[Waiter[Any]], value: Any) -> None:
    """Resume each waiting caller with ``value`` (from the hub: a Waiter is switched to there)."""
    run = get_hub().loop.run_callback
    for w in waiters:
        run(w.switch, value)
