"""gunicorn's configuration and server hooks, shared by both entry points (runs in the master).

``configure()`` loads and validates our configuration (exit 2 with one line on stderr when
invalid), publishes it for the workers and returns gunicorn's settings; gunicorn.conf.py
calls it, so importing this module does nothing. The hooks replace the master's stock HUP
handling (which would restart every worker and block the master while old ones drain) by an
in-place reload: validate, publish, signal the workers. See docs/adr/0004.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from typing import Any, NoReturn

from ntonix.config import Config, ConfigError, handover, load_config
from ntonix.server.settings import gunicorn_settings
from ntonix.server.tls import build_server_context
from ntonix.telemetry import procstat


def _load(*, starting: bool = False) -> Config:
    cfg = load_config(handover.cli_layer())
    if starting:
        check_for_start(cfg)
    elif cfg.server.ssl_port:
        build_server_context(cfg.ssl)  # on HUP: the listener is bound, only the certificates matter
    return cfg


def check_for_start(cfg: Config) -> None:
    """What only the host can tell (the pure configuration cannot): the certificates load and
    the listen address is one (else gunicorn retries binding for seconds, then exits 1)."""
    if cfg.server.ssl_port:
        build_server_context(cfg.ssl)  # a certificate that does not load is a config error
    check_listen_host("server.host", cfg.server.host)


def check_listen_host(where: str, host: str) -> None:
    """An address of this host, or a name that resolves to one, as gunicorn will bind it: an
    IPv6 literal over IPv6, anything else over IPv4 (the name's first IPv4 address). A socket
    binds to it on a port the system picks, closed at once; the configured port is not tried,
    as a listener handed over by a running master holds it."""
    if not host:
        raise ConfigError(f"{where}: must not be empty (0.0.0.0 or :: listens on every address)")
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"{where}: not an address this host can listen on: {host!r} "
                          f"({getattr(exc, 'strerror', None) or exc})") from None


def _is_ipv6(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except (OSError, ValueError):
        return False
    return True


def _fail(exc: ConfigError) -> NoReturn:
    sys.stderr.write(f"ntonix: invalid configuration: {exc}\n")
    sys.stderr.flush()
    os._exit(2)  # before any worker exists; no traceback, nothing else on stderr


_config: Config | None = None


def configure() -> dict[str, Any]:
    """Load, validate and publish the configuration; gunicorn's settings derived from it."""
    global _config
    try:
        _config = _load(starting=True)
    except ConfigError as exc:
        _fail(exc)
    handover.publish(_config)
    procstat.stamp_master()  # uptime and memory of the whole gateway (ntonix.telemetry.procstat)
    # Before anything imports prometheus_client (docs/adr/0006): workers use its multiprocess mode.
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(handover.run_dir(), "metrics"))
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], mode=0o700, exist_ok=True)
    return gunicorn_settings(_config)


def on_starting(server: Any) -> None:
    from ntonix.telemetry.prometheus import wipe  # imports prometheus_client: only now that its directory is set

    wipe(os.environ["PROMETHEUS_MULTIPROC_DIR"])  # figures of an earlier run must not count


def child_exit(server: Any, worker: Any) -> None:
    from ntonix.telemetry.prometheus import mark_process_dead

    mark_process_dead(worker.pid)  # its live gauges go; its counters stay in the sums


def when_ready(server: Any) -> None:
    server.handle_hup = lambda: reload_in_place(server)


def reload_in_place(arbiter: Any) -> None:
    """kill -HUP: re-read file and environment; apply without restarting workers."""
    global _config
    try:
        cfg = _load()
    except ConfigError as exc:
        arbiter.log.error("config.reload_rejected: %s (the running configuration stays)", exc)
        return
    except Exception as exc:  # a bug must not take the master down: the running one stays
        arbiter.log.exception("config.reload_rejected: unexpected %s: %s (the running configuration stays)",
                              type(exc).__name__, exc)
        return
    old = _config
    assert old is not None  # configure() ran when gunicorn read its configuration
    _config = cfg
    handover.publish(cfg)
    arbiter.log.setup(arbiter.cfg)  # the master's own log lines follow the new logging settings
    if (cfg.server.host, cfg.server.port, cfg.server.ssl_port) != (old.server.host, old.server.port,
                                                                     old.server.ssl_port):
        arbiter.log.warning("config.reload: listener changes (server.host/port/ssl_port) need a restart")
    arbiter.log.info("config.reload: %d backends, telling %d workers", len(cfg.backends), len(arbiter.WORKERS))
    for pid in list(arbiter.WORKERS):
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            pass
    if cfg.server.threads != arbiter.num_workers:
        arbiter.num_workers = cfg.server.threads
        arbiter.manage_workers()


def run_gunicorn() -> None:
    """``python -m ntonix``: gunicorn's master with gunicorn.conf.py, wherever we run from."""
    from gunicorn.app.wsgiapp import WSGIApplication

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "gunicorn.conf.py")
    sys.argv = ["ntonix", "-c", conf, "ntonix.wsgi:application"]
    WSGIApplication("%(prog)s [OPTIONS]").run()


def on_exit(server: Any) -> None:
    shutil.rmtree(handover.run_dir(), ignore_errors=True)
