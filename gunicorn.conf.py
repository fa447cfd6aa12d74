# gunicorn -c gunicorn.conf.py ntonix.wsgi   (python -m ntonix uses this file too)
# Every setting comes from NTONIX's own configuration (conf/ntonix.json, NTONIX_* variables):
# see ntonix/server/hooks.py and docs/configuration.md.
from ntonix.server import hooks
from ntonix.server.hooks import child_exit, on_exit, on_starting, when_ready  # noqa: F401 - gunicorn's server hooks

globals().update(hooks.configure())
