"""The configuration: typed, frozen, validated once (``from ntonix.config import Config, load_config``).

``model`` holds the frozen dataclasses and their defaults, ``validate`` turns merged raw values
into them, ``load`` merges the layers (defaults < file < environment < command line) and is
re-exported here whole; ``handover`` passes the master's validated configuration to the workers.
"""

from ntonix.config.load import *  # noqa: F403
from ntonix.config.load import __all__ as __all__
