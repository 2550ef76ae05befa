"""``python -m vmscope.images linux --out DIR``."""

import sys

from vmscope.images.cli import main

sys.exit(main())
