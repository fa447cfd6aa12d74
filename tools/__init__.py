"""NTONIX's own tooling: the bench, soak, replay, demo and the doc/certificate generators.

Not part of the gateway (nothing in ``ntonix/`` imports it). ``scripts/`` holds the short entry
points (``scripts/bench``, ``scripts/soak``, ...); ``tools.procs`` and ``tools.stats`` are the
one copy of the process and statistics helpers they share.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
