"""Where vmscope keeps what it downloads and builds.

``$VMSCOPE_CACHE`` if set, else ``$XDG_CACHE_HOME/vmscope``, else
``~/.cache/vmscope``. Everything in it can be deleted at any time; it is
rebuilt on the next use.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache directory (or a subdirectory of it), created if missing."""
    env = os.environ.get("VMSCOPE_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "vmscope"
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
