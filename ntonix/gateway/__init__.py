"""The request flow of one worker: the WSGI endpoints, the proxy, the bodies it relays, and the
``Runtime`` they share. No gunicorn here; backends only through the
``ntonix.upstream.Transport`` the ``Runtime`` is given (no geventhttpclient)."""
