"""The pure core: state machines, balancing, header rewriting, cache keys and entries, figures.

Every module here imports only ``ntonix.core``, ``ntonix.errors``, ``ntonix.config.model`` and the
standard library (plus orjson and xxhash); clocks and ids are passed in. Checked by path in
tests/unit/test_layering.py.
"""
