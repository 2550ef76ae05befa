"""Guest faults under hardware-KVM semantics: vmscope's VMM inside the nested
lab (KVM on QEMU TCG's emulated AMD SVM), where a triple fault is a real
SVM shutdown intercept rather than PVM's software path.

The guest is built on the host (a few bytes of code in a PVH ELF), copied in
with ``lab.put`` and run with ``vmscope run --accel kvm`` in L1, as a user
would. The module shares the session's lab (tests/lab/conftest.py).

The exit-storm detector (vmscope.kvm.devices.storm) is armed for Linux
guests only (bzImages): its guest is a synthetic bzImage whose 32-bit entry
reads an unemulated port forever, no Linux boot needed.
"""

from __future__ import annotations

import re

import pytest

from tests.kvm_support import bzimage, make_pvh_elf
from tests.lab_support import RERUN_IF_THE_LAB_DIED

pytestmark = [pytest.mark.lab, pytest.mark.slow, RERUN_IF_THE_LAB_DIED]

UD2 = bytes.fromhex("0f0b")  # ud2 with no IDT: #UD -> #DF -> shutdown (triple fault)
GUEST = "/tmp/vmscope-faults/ud2.elf"
# 32-bit: mov $0x2e8,%dx; 1: in (%dx),%al; jmp 1b   (COM4: nothing answers there)
PORT_SPIN = bytes.fromhex("66bae802" "ec" "ebfd")
STORM_GUEST = "/tmp/vmscope-faults/storm.bzImage"


def test_triple_fault_ends_the_vm_with_a_report(lab):
    lab.put(GUEST, make_pvh_elf(UD2))
    # `timeout` in L1 bounds a hang (the failure this test exists for) and
    # the agent's own timeout bounds the call from the host.
    r = lab.run(["timeout", "120", "python3", "-m", "vmscope", "run", "--accel", "kvm", "--kernel", GUEST],
                timeout=300)
    assert r.returncode not in (0, 124), f"exit {r.returncode} (124: hung until timeout)\n{r.stderr[-2000:]}"
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr
    # Real KVM reports the shutdown; the guest's #UD must not be mistaken
    # for an emulation failure there.
    assert re.search(r"vmscope: guest stopped: triple fault", err), err[-2000:]
    assert re.search(r"vCPU 0: rip=0x[0-9a-f]+", err), f"no vCPU registers in the report\n{err[-2000:]}"
    assert "cr0=" in err or "rsp=" in err, f"the report lacks the register dump\n{err[-2000:]}"
    # The lab's KVM is AMD SVM, which resets the vCPU before the exit: the
    # report must not pass the reset state (rip 0xfff0) off as the fault's.
    assert "vCPU 0: rip=0xfff0 " in err and "reset state, not where it faulted" in err, err[-2000:]


def test_exit_storm_ends_a_guest_spinning_on_a_port(lab):
    lab.put(STORM_GUEST, bzimage(kernel=PORT_SPIN + b"\x90" * 4096))
    r = lab.run(["timeout", "300", "python3", "-m", "vmscope", "run", "--accel", "kvm", "--kernel", STORM_GUEST,
                 "--mem", "64"], timeout=500)
    assert r.returncode == 1, f"exit {r.returncode} (124: hung until timeout)\n{r.stderr[-2000:]}"
    assert re.search(r"guest stopped: exit storm: \d+ reads of port 0x2e8 in a row", r.stderr), r.stderr[-2000:]
    assert re.search(r"vCPU 0: rip=0x10000[0-9a-f] .*rdx=0x2e8", r.stderr), r.stderr[-2000:]
