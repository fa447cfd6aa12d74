"""Composition root: builds the gateway of one worker process from a ``Config``.

``build_app(config)`` wires the runtime (the transport to the backends, the registry of backends
and their pools, the cache tiers, the coalescer, telemetry) into a ``Gateway``, the WSGI callable,
with the ``Host`` gunicorn's worker provides. Only the entry point
``ntonix.wsgi`` imports this module; tests/unit/test_layering.py checks that, ``TYPE_CHECKING``
imports included.
"""

from __future__ import annotations

from ntonix.config import Config
from ntonix.gateway.endpoints import Gateway
from ntonix.gateway.runtime import Runtime
from ntonix.server.host import GunicornHost
from ntonix.telemetry.recorder import Telemetry
from ntonix.upstream.transport import GeventTransport


def build_app(config: Config, telemetry: Telemetry | None = None) -> Gateway:
    return Gateway(Runtime(config, telemetry or Telemetry(config), GeventTransport()), GunicornHost())
