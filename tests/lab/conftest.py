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

from tests.lab_support import FORWARDED_GUEST_PORT, LAB_PORTS, _require, kept_lab, require_arm64


@pytest.fixture(scope="session")
def _session_lab():
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "/usr/bin/python3.11"):
        _require(tool)
    from vmscope.lab import Lab

    log = []

    def console(line: str) -> None:
        log.append(line)
        if os.environ.get("VMSCOPE_LAB_CONSOLE"):
            print(f"[L1] {line}", file=sys.stderr, flush=True)

    yield from kept_lab(lambda: Lab(cpus=2, mem_mib=2048, forward=[FORWARDED_GUEST_PORT],
                                    port_range=LAB_PORTS, console=console,
                                    extra_dists=["pytest", "pytest-timeout"]))


@pytest.fixture
def lab(_session_lab):
    """The session's x86 lab, booted again if it died (see kept_lab)."""
    return _session_lab()


@pytest.fixture(scope="module")
def _module_arm64_lab():
    require_arm64()
    from vmscope.lab import Lab

    yield from kept_lab(lambda: Lab(arch="aarch64", cpus=2, mem_mib=2048,
                                    forward=[FORWARDED_GUEST_PORT], port_range=LAB_PORTS,
                                    boot_timeout=900))


@pytest.fixture
def arm64_lab(_module_arm64_lab):
    return _module_arm64_lab()
