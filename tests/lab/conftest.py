"""One lab (L1 under QEMU TCG with real KVM) per test session.

Lab tests need qemu-system-x86_64, apt-get (to fetch Debian's kernel once
into the cache) and Debian's python3.11: ./dev.sh setup installs them, so a
missing one is a failure, not a skip. Host ports come from this suite's range
(14000-14999) so the lab can run beside other suites.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.lab_support import FORWARDED_GUEST_PORT, LAB_PORTS, _require, require_arm64


@pytest.fixture(scope="session")
def lab():
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "/usr/bin/python3.11"):
        _require(tool)
    from vmscope.lab import Lab

    log = []

    def console(line: str) -> None:
        log.append(line)
        if os.environ.get("VMSCOPE_LAB_CONSOLE"):
            print(f"[L1] {line}", file=sys.stderr, flush=True)

    with Lab(cpus=2, mem_mib=2048, forward=[FORWARDED_GUEST_PORT], port_range=LAB_PORTS,
             console=console, extra_dists=["pytest", "pytest-timeout"]) as lab:
        yield lab


@pytest.fixture(scope="module")
def arm64_lab():
    require_arm64()
    from vmscope.lab import Lab

    with Lab(arch="aarch64", cpus=2, mem_mib=2048, forward=[FORWARDED_GUEST_PORT],
             port_range=LAB_PORTS, boot_timeout=900) as lab:
        yield lab
