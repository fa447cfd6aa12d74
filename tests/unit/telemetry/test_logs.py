"""Logging: the JSON and text formats, levels, the access-log switch and shared file rotation.

Each test that calls ``setup_logging`` puts the loggers it touched back as they were.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.config import Config as GunicornConfig

from ntonix.config import Config, LoggingConfig, handover
from ntonix.core.record import RequestRecord
from ntonix.server.glogger import GunicornLogger
from ntonix.telemetry.logs import (
    ACCESS,
    FLUSH_BYTES,
    FLUSH_EVERY_S,
    PIPE_BUF,
    AccessLog,
    JsonFormatter,
    SharedRotatingFileHandler,
    TextFormatter,
    make_formatter,
    setup_logging,
)

TOUCHED = ("ntonix", "ntonix.access", "gunicorn.error", "gunicorn.access", "")


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    saved = {}
    for name in TOUCHED:
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
    srcfile, threads = logging._srcfile, logging.logThreads  # setup_logging turns both off
    yield
    logging._srcfile, logging.logThreads = srcfile, threads
    for name, (handlers, level, propagate, disabled) in saved.items():
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if h not in handlers:
                lg.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in lg.handlers:
                lg.addHandler(h)
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled


def _record(name: str = "ntonix.access", level: int = logging.INFO, msg: str = "request.done",
            **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, (), None)
    rec.created = 1767323045.678  # 2026-01-02T03:04:05.678Z
    rec.__dict__.update(extra)
    return rec


def test_json_line_has_the_standard_fields_then_the_context() -> None:
    line = JsonFormatter().format(_record(method="GET", status=200, ttft_ms=None, backend="a:1"))
    assert "\n" not in line
    data = json.loads(line)
    assert list(data)[:5] == ["timestamp", "level", "component", "pid", "message"]
    assert data["timestamp"] == "2026-01-02T03:04:05.678Z"
    assert (data["level"], data["component"], data["message"]) == ("info", "ntonix.access", "request.done")
    assert {k: data[k] for k in ("method", "status", "ttft_ms", "backend")} == {
        "method": "GET", "status": 200, "ttft_ms": None, "backend": "a:1"}
    for internal in ("msg", "args", "levelno", "pathname", "created", "process"):
        assert internal not in data


def test_json_formats_exceptions_and_odd_values() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        rec = _record(level=logging.ERROR, msg="config.reload_failed %s", where=Path("/x"))
        rec.args = ("now",)
        rec.exc_info = sys.exc_info()
    data = json.loads(JsonFormatter().format(rec))
    assert data["message"] == "config.reload_failed now"
    assert "RuntimeError: boom" in data["exc_info"]
    assert data["where"] == "/x"


def test_text_format_is_one_readable_line() -> None:
    line = make_formatter("text").format(_record(method="GET", status=200, ttft_ms=None))
    assert isinstance(make_formatter("text"), TextFormatter)
    assert line == "2026-01-02T03:04:05.678Z INFO ntonix.access request.done method=GET status=200"


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.usefixtures("restore_loggers")
@pytest.mark.parametrize(("level", "expected"), [
    ("debug", ["d", "i", "request.done", "w"]),
    ("info", ["i", "request.done", "w"]),
    ("warning", ["w"]),
])
def test_level_applies_to_every_logger_and_the_access_log(tmp_path: Path, level: str, expected: list[str]) -> None:
    path = tmp_path / "gw.log"
    setup_logging(LoggingConfig(level=level, file=str(path)))
    log = logging.getLogger("ntonix.proxy")
    log.debug("d")
    log.info("i")
    logging.getLogger("ntonix.access").info("request.done", extra={"status": 200})
    logging.getLogger("gunicorn.error").warning("w")
    assert [line["message"] for line in _lines(path)] == expected


@pytest.mark.usefixtures("restore_loggers")
def test_access_log_switch(tmp_path: Path) -> None:
    path = tmp_path / "gw.log"
    setup_logging(LoggingConfig(file=str(path), access_log=False))
    logging.getLogger("ntonix.access").info("request.done")
    logging.getLogger("ntonix.cache").info("cache.purged")
    assert [line["message"] for line in _lines(path)] == ["cache.purged"]


@pytest.mark.usefixtures("restore_loggers")
def test_reconfiguring_replaces_handlers_instead_of_stacking(tmp_path: Path) -> None:
    cfg = LoggingConfig(file=str(tmp_path / "gw.log"))
    setup_logging(cfg)
    setup_logging(cfg)
    assert len(logging.getLogger("ntonix").handlers) == 1
    assert len([h for h in logging.getLogger().handlers if getattr(h, "_ntonix", False)]) == 1
    logging.getLogger("ntonix").info("once")
    assert [line["message"] for line in _lines(tmp_path / "gw.log")] == ["once"]


def _handler(path: Path, max_bytes: int, backups: int, check_every_s: float = 0.0) -> SharedRotatingFileHandler:
    h = SharedRotatingFileHandler(str(path), max_bytes, backups, check_every_s=check_every_s)
    h.setFormatter(logging.Formatter("%(message)s"))
    return h


def test_rotation_keeps_backup_count_files(tmp_path: Path) -> None:
    path = tmp_path / "gw.log"
    h = _handler(path, max_bytes=100, backups=2)
    try:
        for i in range(40):
            h.emit(_record(msg=f"line-{i:02d}-" + "x" * 10))
    finally:
        h.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "gw.log", "gw.log.1", "gw.log.2"]
    newest = path.read_text().splitlines()
    assert newest == [] or newest[-1].startswith("line-39")
    assert all(len(p.read_text()) <= 100 + 20 for p in tmp_path.glob("gw.log*") if not p.name.endswith(".lock"))


def test_rotation_with_two_writers_loses_no_line(tmp_path: Path) -> None:
    """Two handlers on one file stand for two processes (master and worker, or two workers)."""
    path = tmp_path / "gw.log"
    a, b = _handler(path, 300, 50), _handler(path, 300, 50)
    try:
        for i in range(100):
            (a if i % 3 else b).emit(_record(msg=f"n{i:03d}" + "." * 16))
    finally:
        a.close()
        b.close()
    files = [p for p in tmp_path.glob("gw.log*") if not p.name.endswith(".lock")]
    assert len(files) > 3  # it did rotate, several times
    seen = sorted(line for p in files for line in p.read_text().splitlines())
    assert seen == [f"n{i:03d}" + "." * 16 for i in range(100)]


def test_rotation_without_backups_empties_the_file_in_place(tmp_path: Path) -> None:
    path = tmp_path / "gw.log"
    h = _handler(path, 50, 0)
    try:
        for i in range(30):
            h.emit(_record(msg=f"line {i:02d}"))
    finally:
        h.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw.log", "gw.log.lock"]
    assert path.stat().st_size < 60 and path.read_text().splitlines()[-1] == "line 29"


def test_checks_are_throttled_and_a_late_writer_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "gw.log"
    slow = _handler(path, 10_000, 3, check_every_s=3600.0)  # does not look again within this test
    fast = _handler(path, 40, 3)
    try:
        slow.emit(_record(msg="slow 1"))
        for i in range(2):
            fast.emit(_record(msg=f"fast {i} " + "." * 40))  # each line fills a file: two rotations
        slow.emit(_record(msg="slow 2"))  # into the file it opened, rotated twice meanwhile
    finally:
        slow.close()
        fast.close()
    assert (tmp_path / "gw.log.2").read_text().splitlines() == ["slow 1", "fast 0 " + "." * 40, "slow 2"]
    assert (tmp_path / "gw.log.1").read_text().splitlines() == ["fast 1 " + "." * 40]
    assert path.read_text() == ""


# ----------------------------------------------------------------------------- gunicorn's logger


@pytest.fixture
def gunicorn_logger_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            restore_loggers: None) -> Iterator[tuple[Path, list[GunicornLogger]]]:
    path = tmp_path / "master.log"
    monkeypatch.setattr(handover, "current", lambda: Config(logging=LoggingConfig(file=str(path), level="info")))
    made: list[GunicornLogger] = []
    yield path, made
    for lg in made:
        if lg.sock is not None:
            lg.sock.close()


def _gunicorn_cfg(**settings: str) -> GunicornConfig:
    cfg = GunicornConfig()
    for key, value in {"errorlog": "-", "loglevel": "debug", **settings}.items():
        cfg.set(key, value)
    return cfg


def test_gunicorn_lines_use_our_format_destination_and_level(
        gunicorn_logger_factory: tuple[Path, list[GunicornLogger]]) -> None:
    path, made = gunicorn_logger_factory
    made.append(lg := GunicornLogger(_gunicorn_cfg()))
    lg.debug("not at info")
    lg.info("Booting worker with pid: %s", 42)
    assert lg.sock is None  # no statsd_host: no socket at all
    lg.access(SimpleNamespace(status="200 OK"), None, {}, timedelta(milliseconds=3))  # no access log of its own
    (line,) = _lines(path)
    assert (line["component"], line["level"]) == ("gunicorn.error", "info")
    assert line["message"] == "Booting worker with pid: 42"


def test_gunicorn_statsd_sends_and_stays_quiet_when_the_daemon_is_down(
        gunicorn_logger_factory: tuple[Path, list[GunicornLogger]]) -> None:
    path, made = gunicorn_logger_factory
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    made.append(lg := GunicornLogger(_gunicorn_cfg(statsd_host=f"127.0.0.1:{port}", statsd_prefix="gw")))
    resp = SimpleNamespace(status="200 OK")
    lg.access(resp, None, {}, timedelta(milliseconds=3))
    lg.info("Booting worker with pid: %s", 42)  # no figure in it: nothing sent
    lg.warning("Worker timeout")
    packets = [listener.recv(1024).decode() for _ in range(2)]
    listener.close()
    assert packets == ["gw.gunicorn.request.duration:3.0|ms\ngw.gunicorn.requests:1|c|@1.0\n"
                       "gw.gunicorn.request.status.200:1|c|@1.0",  # one datagram per request
                       "gw.gunicorn.log.warning:1|c|@1.0"]
    for _ in range(5):  # nobody listens any more: ECONNREFUSED on every other send
        lg.access(resp, None, {}, timedelta(milliseconds=3))
    assert [line["message"] for line in _lines(path)] == ["Booting worker with pid: 42", "Worker timeout"]


# ----------------------------------------------------------------------------- buffered access log


class _Writes(logging.Handler):
    """Every write the access log makes, as the text handed to the handler."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.writes.append(record.getMessage())

    @property
    def lines(self) -> list[str]:
        return [ln for w in self.writes for ln in w.split("\n")]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _access(fmt: str = "json", **cfg: object) -> tuple[AccessLog, _Writes, _Clock]:
    mono = _Clock()
    access = AccessLog(clock=lambda: 1767323045.678, monotonic=mono)
    out = _Writes()
    access.configure(LoggingConfig(format=fmt, **cfg), out)  # type: ignore[arg-type]
    return access, out, mono


def _done(i: int = 1, **kw: object) -> RequestRecord:
    rec = RequestRecord("POST", "/v1/chat/completions", f"rid-{i}", "10.0.0.9", status=200, cache="MISS",
                        backend="b:1", bytes_sent=42, **kw)  # type: ignore[arg-type]
    rec.latency_ms = 1.23456
    return rec


def test_access_json_line_is_what_the_logging_formatter_writes() -> None:
    access, out, _ = _access()
    access.request(_done(error="client_gone"), ttft_ms=None)
    access.flush()
    (line,) = out.lines
    fields = {"method": "POST", "path": "/v1/chat/completions", "status": 200, "latency_ms": 1.235, "ttft_ms": None,
              "cache": "MISS", "backend": "b:1", "bytes_sent": 42, "client": "10.0.0.9", "request_id": "rid-1",
              "error": "client_gone", "model": None, "prompt_tokens": None, "completion_tokens": None,
              "cached_tokens": None}
    assert line == JsonFormatter().format(_record(process=access._pid, **fields))


def test_access_text_line_is_what_the_text_formatter_writes() -> None:
    access, out, _ = _access("text")
    access.request(_done(), ttft_ms=3.5)
    access.flush()
    expected = make_formatter("text").format(_record(method="POST", path="/v1/chat/completions", status=200,
                                                     latency_ms=1.235, ttft_ms=3.5, cache="MISS", backend="b:1",
                                                     bytes_sent=42, client="10.0.0.9", request_id="rid-1"))
    assert out.lines == [expected]


def test_access_lines_wait_for_the_flush_interval_or_the_buffer_size() -> None:
    access, out, mono = _access()
    access.request(_done(1), None)
    access.flush_if_due()
    assert out.writes == []  # less than FLUSH_EVERY_S since the last flush
    mono.now += FLUSH_EVERY_S
    access.flush_if_due()
    assert [json.loads(ln)["request_id"] for ln in out.lines] == ["rid-1"]
    n = 0
    while not out.writes[1:]:  # no clock movement: only the size bound writes
        n += 1
        access.request(_done(n), None)
    assert len(out.lines) == 1 + n and sum(len(ln) + 1 for ln in out.lines[1:]) >= FLUSH_BYTES


def test_access_writes_to_a_pipe_are_whole_lines_within_pipe_buf(tmp_path: Path) -> None:
    access, out, _ = _access()
    for i in range(200):
        access.request(_done(i), None)
    access.flush()  # the _Writes handler has no regular file: writes are bounded for a pipe
    assert len(out.writes) > 1
    assert all(len(w.encode()) + 1 <= PIPE_BUF for w in out.writes)
    assert [json.loads(ln)["request_id"] for ln in out.lines] == [f"rid-{i}" for i in range(200)]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_line_that_would_pass_pipe_buf_has_its_long_strings_cut(fmt: str) -> None:
    # The audit: 5,000-character paths made lines of over 4 KiB, which two workers' writes to one
    # pipe spliced into each other (valid JSON with another worker's bytes in the path).
    access, out, _ = _access(fmt)
    rec = _done(1, error="\x01" * 3000, model="m" * 3000)
    rec.path = "/echo/" + "a" * 5000
    access.request(rec, None)
    access.request(_done(2), None)
    access.flush()
    assert len(out.lines) == 2 and all(len(ln.encode()) + 1 <= PIPE_BUF for ln in out.lines)
    assert all(len(w.encode()) + 1 <= PIPE_BUF for w in out.writes)
    if fmt == "json":
        cut = json.loads(out.lines[0])
        assert cut["path"].startswith("/echo/aaaa") and cut["path"].endswith("...")
        assert cut["request_id"] == "rid-1" and cut["status"] == 200
        assert json.loads(out.lines[1])["path"] == "/v1/chat/completions"  # short lines untouched


def test_access_lines_go_to_the_old_destination_on_reconfiguration_and_none_when_off(tmp_path: Path) -> None:
    access, old, _ = _access()
    access.request(_done(1), None)
    new = _Writes()
    access.configure(LoggingConfig(), new)  # HUP: what was buffered is written where it was headed
    assert [json.loads(ln)["request_id"] for ln in old.lines] == ["rid-1"] and new.writes == []
    access.configure(LoggingConfig(access_log=False), None)
    assert not access.enabled
    access.configure(LoggingConfig(level="warning"), _Writes())
    assert not access.enabled  # at warning and above there are no access lines


def test_access_lines_buffered_before_a_fork_stay_with_the_parent() -> None:
    access, out, _ = _access()
    access.request(_done(1), None)
    access.after_fork()
    access.flush()
    assert out.writes == []


def test_setup_logging_sends_access_lines_to_the_log_file(tmp_path: Path, restore_loggers: None) -> None:
    path = tmp_path / "gw.log"
    setup_logging(LoggingConfig(file=str(path)))
    try:
        assert ACCESS.enabled
        ACCESS.request(_done(7), None)
        ACCESS.flush()
        line = json.loads(path.read_text().splitlines()[-1])
        assert (line["message"], line["request_id"]) == ("request.done", "rid-7")
    finally:
        ACCESS.configure(LoggingConfig(), None)
