"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py ntonix.wsgi`` loads ``application``."""

from __future__ import annotations

from ntonix.app import build_app
from ntonix.config.handover import current
from ntonix.telemetry.logs import setup_logging

_config = current()
setup_logging(_config.logging)
application = build_app(_config)
