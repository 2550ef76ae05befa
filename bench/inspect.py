#!/usr/bin/env python3
"""``ps`` and a 64 MiB physical read through pure RSP vs shared guest RAM,
against the same QEMU guest (see ``vmscope.client.bench`` for the details)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmscope.client.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
