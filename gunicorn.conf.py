# gunicorn -c gunicorn.conf.py ntonix.wsgi
# Every setting comes from NTONIX's own configuration (conf/ntonix.json, NTONIX_* variables):
# see ntonix/gunicorn_conf.py and docs/configuration.md.
from ntonix.gunicorn_conf import *  # noqa: F403
