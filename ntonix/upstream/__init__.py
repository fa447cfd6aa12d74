"""Talking to backends: the ``Transport`` seam the request flow is given (``base``), its real
geventhttpclient implementation (``transport``, the only geventhttpclient user), a scripted one
for tests (``fake``) and the health prober.
"""

from ntonix.upstream.base import PoolBusy, SendFailed, Transport, Unanswered, UpstreamBroken, UpstreamResponse

__all__ = ["PoolBusy", "SendFailed", "Transport", "Unanswered", "UpstreamBroken", "UpstreamResponse"]
