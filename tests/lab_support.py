"""Helpers of the lab tests (tests/lab): the suite's host port range, the
guest port the lab forwards, and the checks for the tools a lab needs. The
``lab``/``arm64_lab`` fixtures stay in tests/lab/conftest.py; test modules
import these from here, not from the conftest (pytest's, not a helper module).
"""

from __future__ import annotations

import os
import shutil

import pytest

LAB_PORTS = (14000, 14999)
FORWARDED_GUEST_PORT = 5555


def _require(tool: str) -> None:
    if shutil.which(tool) is None and not os.path.exists(tool):
        pytest.fail(f"{tool} is not installed (./dev.sh setup installs it)")


def arm64_enabled() -> bool:
    import subprocess

    out = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True)
    return "arm64" in out.stdout.split()


def require_arm64() -> None:
    """The arm64 lab needs Debian's arm64 packages: a host choice
    (dpkg --add-architecture arm64 && apt-get update), so without it the
    tests skip, unless VMSCOPE_REQUIRE_LAB=1 says this machine must run them."""
    for tool in ("qemu-system-aarch64", "apt-get", "dpkg-deb"):
        _require(tool)
    if not arm64_enabled():
        msg = "arm64 is not a dpkg architecture here (dpkg --add-architecture arm64 && apt-get update)"
        if os.environ.get("VMSCOPE_REQUIRE_LAB") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
