"""The request flow in one process: a ``Gateway`` over a ``ScriptedTransport``, driven by a
plain WSGI environ. No gunicorn, no sockets: each request takes well under a millisecond.

    flow = Flow(tmp_path, B1, B2)
    flow.transport.script(B1, Reply(fail="refuse"))
    flow.transport.script(B2, Reply(200, chunks=[b"{}"]))
    answer = flow.request()
    assert answer.status == 200 and answer.read() == b"{}"
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import gevent
import orjson

from ntonix.config import Config, build_config
from ntonix.core.record import RequestRecord
from ntonix.core.registry import Backend
from ntonix.gateway.endpoints import Gateway
from ntonix.gateway.runtime import Runtime
from ntonix.server.host import GunicornHost
from ntonix.telemetry.recorder import Telemetry
from ntonix.upstream.fake import ScriptedTransport
from tests.fakes import FakeClock

B1, B2, B3 = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"
CHAT = "/v1/chat/completions"


def chat(stream: bool = False, content: str = "hi") -> bytes:
    return orjson.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": content}]})


class RecordingTelemetry(Telemetry):
    """The real telemetry (this process only) that also keeps each finished record."""

    def __init__(self, config: Config) -> None:
        super().__init__(config, metrics_dir="")
        self.records: list[RequestRecord] = []

    def finished(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        super().finished(rec)


class ClientSocket:
    """Stands in for ``environ["gunicorn.socket"]``: records timeouts and a shutdown (the cut a
    client sees as a broken body). ``fileno`` fails, so no disconnect watch is armed."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []
        self.shut = False

    def settimeout(self, value: float | None) -> None:
        self.timeouts.append(value)

    def shutdown(self, how: int) -> None:
        self.shut = True

    def fileno(self) -> int:
        raise OSError("not a real socket")


class HostResponse:
    """The host's side of ``start_response``. gunicorn's is a bound method of its Response,
    which can force the connection to close after this answer (``force_close``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []
        self.forced = False

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
        self.calls.append((status, headers))

    def force_close(self) -> None:
        self.forced = True


class Answer:
    """What the WSGI app answered: status, headers and the body iterable, read on demand;
    ``forced``: the connection is to close after it."""

    def __init__(self, host: HostResponse, body: Iterable[bytes]) -> None:
        assert len(host.calls) == 1, "start_response must be called once, before the body"
        status, self.headers = host.calls[0]
        self.status_line = status
        self.status = int(status.split()[0])
        self.forced = host.forced
        self.body = body
        self._it: Iterator[bytes] = iter(body)
        self.closed = False

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def next(self) -> bytes:
        return next(self._it)

    def read(self) -> bytes:
        """The rest of the body, then ``close()``, as gunicorn does."""
        try:
            return b"".join(self._it)
        finally:
            self.close()

    def json(self) -> Any:
        return orjson.loads(self.read())

    def close(self) -> None:
        self.closed = True
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


class Flow:
    """A gateway of one worker over scripted backends, with a fake breaker clock."""

    def __init__(self, tmp_path: Path, *backends: str, cache: bool | dict[str, Any] = False,
                 **sections: dict[str, Any]) -> None:
        """``cache``: on or off, or its settings (then on); ``sections``: more settings by section."""
        raw: dict[str, Any] = {
            "server": {"ssl_port": 0},
            "backends": [{"host": b.rpartition(":")[0], "port": int(b.rpartition(":")[2])} for b in backends],
            "cache": {"enabled": bool(cache), "dir": str(tmp_path / "cache"),
                      **(cache if isinstance(cache, dict) else {})},
            "health": {"enabled": False},
            # A test that leaves a flight open makes the next identical request follow it until
            # this timeout: short, so such a mistake fails fast instead of hanging.
            "proxy": {"read_timeout_s": 2},
        }
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        self.config = build_config(raw, check_files=False)
        self.clock = FakeClock()
        self.transport = ScriptedTransport()
        self.telemetry = RecordingTelemetry(self.config)
        self.runtime = Runtime(self.config, self.telemetry, self.transport, clock=self.clock)
        self.app = Gateway(self.runtime, GunicornHost())

    def backend(self, address: str) -> Backend:
        return self.runtime.registry.backends[address]

    def environ(self, method: str = "POST", path: str = CHAT, body: bytes = b"", headers: dict[str, str] | None = None,
                sock: ClientSocket | None = None) -> dict[str, Any]:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method, "PATH_INFO": path, "RAW_URI": path, "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
        }
        if body or method == "POST":
            environ["CONTENT_LENGTH"] = str(len(body))
            environ["CONTENT_TYPE"] = "application/json"
        for name, value in (headers or {}).items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        if sock is not None:
            environ["gunicorn.socket"] = sock
        return environ

    def request(self, method: str = "POST", path: str = CHAT, body: bytes | None = None,
                headers: dict[str, str] | None = None, sock: ClientSocket | None = None) -> Answer:
        if body is None:
            body = chat() if method == "POST" else b""
        return self.call(self.environ(method, path, body, headers, sock))

    def call(self, environ: dict[str, Any]) -> Answer:
        # Between two requests a worker's event loop turns: callbacks queued by the last one
        # run (e.g. a batched L2 write, ntonix/cache/__init__.py ``store(defer=...)``).
        gevent.sleep(0)
        host = HostResponse()
        return Answer(host, self.app(environ, host.start_response))  # type: ignore[arg-type]
