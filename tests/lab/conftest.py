"""One lab (L1 under QEMU TCG with real KVM) per test session.

Lab tests need qemu-system-x86_64, apt-get (to fetch Debian's kernel once
into the cache) and Debian's python3.11: ./dev.sh setup installs them, so a
missing one is a failure, not a skip. Host ports come from this suite's range
(14000-14999) so the lab can run beside other suites.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

LAB_PORTS = (14000, 14999)
FORWARDED_GUEST_PORT = 5555


def _require(tool: str) -> None:
    if shutil.which(tool) is None and not os.path.exists(tool):
        pytest.fail(f"{tool} is not installed (./dev.sh setup installs it)")


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


@pytest.fixture(scope="module")
def arm64_lab():
    require_arm64()
    from vmscope.lab import Lab

    with Lab(arch="aarch64", cpus=2, mem_mib=2048, forward=[FORWARDED_GUEST_PORT],
             port_range=LAB_PORTS, boot_timeout=900) as lab:
        yield lab
