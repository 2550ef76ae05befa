#!/usr/bin/env python3
"""``ps`` and a 64 MiB physical read through pure RSP vs shared guest RAM,
against the same QEMU guest (see ``vmscope.client.bench`` for the details)."""

import os
import sys

# This file's name shadows the standard library's ``inspect`` for anything
# run from bench/: put the repository root where the script's folder was.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from vmscope.client.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
