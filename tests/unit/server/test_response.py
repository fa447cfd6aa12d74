"""The worker's gunicorn patches that need no socket: one ``wsgi.errors`` per worker."""

from __future__ import annotations

import io
import logging

import pytest
from gunicorn import util
from gunicorn.config import Config as GConfig
from gunicorn.http import wsgi
from gunicorn.http.wsgi import Response, base_environ

from ntonix.server import response as gresponse


def test_wsgi_errors_is_made_once_per_configuration_and_still_reaches_the_error_log() -> None:
    cfg = GConfig()
    cfg.set("errorlog", "/dev/null")  # not "-": the streams are the error log's handlers'
    a, b = gresponse.errors_wrapper(cfg), gresponse.errors_wrapper(cfg)
    assert a is b
    assert gresponse.errors_wrapper(GConfig()) is not a
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    errorlog = logging.getLogger("gunicorn.error")
    errorlog.addHandler(handler)  # added after the wrapper was made: found when written to
    try:
        assert a.write("app said: oops\n") == len("app said: oops\n")
    finally:
        errorlog.removeHandler(handler)
    assert out.getvalue() == "app said: oops\n"


def test_install_makes_gunicorn_use_the_shared_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    # install() patches gunicorn for the whole process, as in a worker (ntonix/server/worker.py):
    # let monkeypatch put back everything it replaces once this test is done.
    for name in ("send_headers", "_emit_body", "write", "close"):
        monkeypatch.setattr(Response, name, getattr(Response, name))
    monkeypatch.setattr(util, "http_date", util.http_date)
    monkeypatch.setattr(wsgi, "WSGIErrorsWrapper", wsgi.WSGIErrorsWrapper)
    gresponse.install()
    cfg = GConfig()
    first, second = base_environ(cfg)["wsgi.errors"], base_environ(cfg)["wsgi.errors"]
    assert first is second and isinstance(first, gresponse.SharedErrors)


def test_trusted_proxy_check_is_remembered_per_peer_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from gunicorn.http.message import HeaderPolicy

    for name in ("send_headers", "_emit_body", "write", "close"):
        monkeypatch.setattr(Response, name, getattr(Response, name))
    monkeypatch.setattr(util, "http_date", util.http_date)
    monkeypatch.setattr(wsgi, "WSGIErrorsWrapper", wsgi.WSGIErrorsWrapper)
    monkeypatch.setattr(HeaderPolicy, "_peer_is_trusted_proxy", HeaderPolicy._peer_is_trusted_proxy)
    monkeypatch.setattr(gresponse, "_trusted_peers", {})
    monkeypatch.setattr(gresponse, "_TRUSTED_PEERS_MAX", 2)
    gresponse.install()
    cfg = GConfig()
    cfg.set("forwarded_allow_ips", "127.0.0.1,::1")

    class Peer(HeaderPolicy):  # what gunicorn's Message has when it asks
        def __init__(self, addr: object) -> None:
            self.cfg = cfg
            self.peer_addr = addr

    def trusted(addr: object) -> bool:
        return bool(Peer(addr)._peer_is_trusted_proxy())

    for _ in range(2):  # asked, then remembered: the same answers
        assert trusted(("127.0.0.1", 5000)) and trusted(("::1", 5001, 0, 0))
        assert not trusted(("10.0.0.1", 5002)) and not trusted(("127.0.0.2", 5003))
        assert trusted("/run/ntonix.sock")  # a unix socket: no address to check
    # Remembered up to the bound (2 here), then forgotten all at once: the last two are held.
    assert gresponse._trusted_peers == {"10.0.0.1": False, "127.0.0.2": False}
