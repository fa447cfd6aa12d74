"""Write a self-signed development certificate for localhost (tools/gen_dev_cert.py).

    python scripts/gen_dev_cert.py [--out-dir conf] [--force] [--days 365]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.gen_dev_cert import main  # noqa: E402

sys.exit(main())
