"""Helpers of the lab tests (tests/lab): the suite's host port range, the
guest port the lab forwards, and the checks for the tools a lab needs. The
``lab``/``arm64_lab`` fixtures stay in tests/lab/conftest.py; test modules
import these from here, not from the conftest (pytest's, not a helper module).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Callable, Iterator

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


def kept_lab(make: Callable[[], "Lab"]) -> Iterator[Callable[[], "Lab"]]:
    """For a lab fixture: yields a function that returns a running lab,
    booting a new one (``make()``, not yet started) when the one before died.

    L1 is a Debian kernel running KVM's nested SVM on QEMU's emulated SVM,
    and it has died under lab tests (twice before vmscope hid XSAVE where
    the lab's KVM cannot follow a guest's XCR0, once after; silently, or
    with "stack guard page was hit" in L1's page-fault handler,
    in the VMM's process: L1 running on its L2 guest's GS base,
    docs/kvm-notes.md). Without
    this, one such death fails every later test of the module with "the lab
    is not running". An L1 whose QEMU runs but whose agent no longer starts
    commands (wedged, :data:`~vmscope.lab.lab.LAB_WEDGED`) is replaced the
    same way: it once failed three tests in a row with "the lab agent did
    not start". With it, only the test running at the time fails (its
    error carries L1's console), and :data:`RERUN_IF_THE_LAB_DIED` gives
    that test one more run in the new lab: the run must then pass on its own.
    """
    current: list = []

    def running():
        if current and not current[0].usable:
            dead = current.pop()
            how = "died" if not dead.running else "stopped starting commands"
            print(f"\nthe lab {how} (console: {dead.console_log}); booting a new one",
                  file=sys.stderr, flush=True)
            dead.close()
        if not current:
            lab = make()
            lab.start()
            current.append(lab)
        return current[0]

    try:
        yield running
    finally:
        for lab in current:
            lab.close()


#: said (by :class:`GuestTripleFaultInLab`) when a guest in the lab
#: triple-faulted: see :func:`raise_if_the_guest_triple_faulted`
LAB_GUEST_TRIPLE_FAULT = "the lab's guest triple-faulted"
#: what vmscope prints when its guest triple-faulted
TRIPLE_FAULT_REPORT = "guest stopped: triple fault"


class GuestTripleFaultInLab(AssertionError):
    """A lab test failed because its L2 guest triple-faulted (vmscope's
    stderr says so): while stock gdb drove page-protection breakpoints, or
    under heavy console output (docs/kvm-notes.md)."""


def raise_if_the_guest_triple_faulted(vm, failure: BaseException) -> None:
    """Re-raise ``failure`` as :class:`GuestTripleFaultInLab` when vmscope
    (``vm``, a lab process) reported a triple fault of its guest, on either
    stream (a pty merges them) within a few seconds.

    Why: in the lab, KVM runs on QEMU TCG's emulated SVM, where vmscope's
    breakpoints are pages pulled out of the memory slots and every hit is
    single-stepped (docs/kvm-notes.md). Under that load the emulated SVM
    loses state: L1 itself died once with the L2 guest's per-CPU address in
    CR2 in its own page-fault handler (L1 running on L2's GS base), and a
    2-vCPU Linux guest's breakpoint loop ended in a triple fault of a vCPU
    in 3 of 24 runs, one traced to a timer interrupt that KVM delivered
    during a step it was told to keep interrupts out of
    (``KVM_GUESTDBG_BLOCKIRQ``). A VMM cannot cause either on real SVM.
    Heavy console output alone did it too (vCPU 1 triple-faulted while a
    `dmesg` or a `ps` listing printed), and QEMU as the L2 VMM stalled and
    then lost L1 under the same load. The test then gets the one rerun
    :data:`RERUN_IF_THE_LAB_DIED` allows; a vmscope bug that kills the
    guest every time still fails it."""
    try:
        vm.wait_for_output(TRIPLE_FAULT_REPORT, timeout=5)
    except Exception:  # not said (LabTimeout), or the process is gone without saying it
        return
    raise GuestTripleFaultInLab(f"{LAB_GUEST_TRIPLE_FAULT}: {failure}") from failure


LAB_GUEST_STALLED = "the lab's guest made no progress: its jiffies stood still across continues"


class GuestStalledInLab(AssertionError):
    """A lab test failed because its L2 guest stopped advancing its own
    clock while the debugger let it run: ``jiffies`` read the same at the
    last three stops or more. Heavy interrupt load stalls the lab's guests
    whatever the VMM (docs/kvm-notes.md: QEMU ``-enable-kvm`` as the L2 VMM
    stalled, then L1 died); a VMM that never resumed its vCPUs would fail
    the rerun too."""


def raise_if_the_guest_clock_stood_still(jiffies: list[int], failure: str) -> None:
    """Raise :class:`GuestStalledInLab` when the last three (or more)
    ``jiffies`` values read at the stops of continues are the same: the
    guest stalled, at the start or part-way (a CI run read one value at
    three stops, another value at the next three; both vCPUs sat at the
    same addresses throughout)."""
    last = jiffies[-1] if jiffies else None
    still = next((i for i, j in enumerate(reversed(jiffies)) if j != last), len(jiffies))  # equal values at the end
    if still >= 3:
        raise GuestStalledInLab(f"{LAB_GUEST_STALLED} (jiffies {last:#x} at the last {still} of "
                                f"{len(jiffies)} stops): {failure}")


def _rerun_if_the_lab_died() -> pytest.MarkDecorator:
    from vmscope.lab.lab import LAB_DIED, LAB_WEDGED

    return pytest.mark.flaky(reruns=1, only_rerun=[LAB_DIED, LAB_WEDGED, LAB_GUEST_TRIPLE_FAULT,
                                                   LAB_GUEST_STALLED])


RERUN_IF_THE_LAB_DIED = _rerun_if_the_lab_died()
"""One more run of a lab test whose L1 died under it (QEMU exited, its
console in the error) or stopped starting commands (a timeout after which
the agent could not start ``true``: :meth:`~vmscope.lab.Lab.still_answers`), or whose guest triple-faulted under a debugger there
(:func:`raise_if_the_guest_triple_faulted`), or whose guest's clock stood
still across continues (:func:`raise_if_the_guest_clock_stood_still`):
never for a failure of the test's own assertions."""


def ended_with_status_0(vm, timeout: float):
    """Wait for ``vm`` (a ``vmscope run`` in the lab, after the guest's
    ``poweroff`` or ``reboot``) to end and check its status is 0; the
    failure shows both streams (a pty merges them into stdout). A guest
    that triple-faulted instead gets the rerun
    (:func:`raise_if_the_guest_triple_faulted`). Returns the result."""
    from vmscope.lab.process import LabTimeout

    try:
        result = vm.wait(timeout)
    except LabTimeout as e:  # what the VMM and its guest printed last: where it stood
        _fail_with_output(f"vmscope did not end within {timeout} s", e.result, 4000)
    if result.returncode != 0:
        _fail_with_output(f"vmscope ended with status {result.returncode}", result, 2000)
    return result


def _fail_with_output(what: str, result, stdout_tail: int):
    """Raise ``what`` with the tails of ``result``'s streams (None: nothing
    was kept), as the rerun's error when they report a triple fault."""
    out, err = ("", "") if result is None else (result.stdout, result.stderr)
    failure = AssertionError(f"{what}\nstdout:\n{out[-stdout_tail:]}\nstderr:\n{err[-2000:]}")
    if TRIPLE_FAULT_REPORT in out + err:
        raise GuestTripleFaultInLab(f"{LAB_GUEST_TRIPLE_FAULT}: {failure}") from failure
    raise failure


STALL_REPORTS = r"soft lockup|detected stalls? on CPU|self-detected stall"
"""What Linux prints when its soft-lockup watchdog or RCU stall detector fires."""


def assert_the_guest_reported_no_stalls(vm, expect, timeout: float) -> None:
    """After a debugger held a Linux guest: let its watchdog sample twice
    (every 4 s) and RCU tick, then count stall reports in its ``dmesg``
    (``expect(vm, pattern, timeout)`` is the test module's console wait)."""
    vm.write("sleep 10; echo stalls=$(dmesg | grep -cE '" + STALL_REPORTS + "')\n")
    m = expect(vm, r"stalls=(\d+)", timeout)
    assert m.group(1) == "0", vm.stdout[-3000:]
