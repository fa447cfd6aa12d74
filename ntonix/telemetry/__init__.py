"""Telemetry: what the gateway counts and where it goes.

``recorder.Telemetry`` is one worker's facade (request counts, backend results, ``/metrics``);
``prometheus`` keeps the cross-worker counters (prometheus_client's multiprocess mode),
``statsd`` pushes per-request timers, ``procstat`` reads process figures, ``logs`` sets up
structured logging. This file imports nothing: the master imports ``procstat`` before
``PROMETHEUS_MULTIPROC_DIR`` is set, and prometheus_client must not be loaded by then.
"""
