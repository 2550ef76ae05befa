"""``python -m vmscope.lab run -- CMD`` / ``shell`` / ``build``."""

import sys

from vmscope.lab.cli import main

sys.exit(main())
