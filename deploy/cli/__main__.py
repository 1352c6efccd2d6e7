"""``python -m deploy.cli``: the same as ``edge-deploy``."""

import sys

from deploy.cli import main

sys.exit(main())
