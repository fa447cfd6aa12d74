"""The gunicorn edge: hooks, settings, the gevent worker, response writing, TLS, disconnect watch,
the gunicorn logger. The only package that imports gunicorn.
"""
