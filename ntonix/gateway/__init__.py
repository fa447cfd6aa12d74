"""The request flow of one worker: the WSGI endpoints, the proxy, the bodies it relays, and the
``Runtime`` they share. No gunicorn here; sockets only through ``ntonix.upstream.transport``."""
