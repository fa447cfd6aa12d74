"""A mock OpenAI-compatible LLM backend for NTONIX's tests, demos and benchmarks.

Run it with ``python -m mock_llm --port 8001``; build the WSGI app with
``mock_llm.app.create_app(name)``. Flask is imported only by ``mock_llm.app``, so that the
gunicorn worker can monkey-patch before it is loaded.
"""

from __future__ import annotations
