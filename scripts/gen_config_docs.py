#!/usr/bin/env python3
"""Generate docs/configuration.md (tools/gen_config_docs.py).

    python scripts/gen_config_docs.py            # (re)write docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 when the file is not up to date
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.gen_config_docs import main  # noqa: E402

sys.exit(main())
