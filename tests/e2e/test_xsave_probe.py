"""The XSETBV probe (vmscope/kvm/x86/xsave_probe.py) on this host's KVM,
and what hiding XSAVE does to a CPUID table. Where KVM does not see a
guest's XSETBV (QEMU TCG's emulated SVM, the nested lab) the lab's Linux
tests show the effect: no "XSAVE consistency problem" at boot."""

from __future__ import annotations

import pytest

from tests.support import require_kvm
from vmscope.kvm import abi
from vmscope.kvm.x86 import xsave_probe


def _supported_cpuid():
    from vmscope.kvm.system import open_kvm
    from vmscope.kvm.x86.machine import KvmMachine

    fd = open_kvm()
    machine = KvmMachine.__new__(KvmMachine)  # only its KVM_GET_SUPPORTED_CPUID helper
    machine.kvm_fd = fd
    return fd, machine._supported_cpuid()


def test_probe_runs_a_guest_xsetbv_and_reads_kvms_xcr0():
    """The probe VM really runs: real KVM (and this host's software KVM,
    which emulates the guest's ring 0) sees the XSETBV and holds XCR0=3."""
    require_kvm()
    fd, entries = _supported_cpuid()
    for e in entries:  # the probe needs XSAVE in CPUID, as a Linux host's KVM offers it
        if e.function == 1:
            e.ecx |= xsave_probe.CPUID1_ECX_XSAVE
    assert xsave_probe._probe(fd, entries) is True


def test_probe_answer_is_kept_per_host_boot(tmp_path, monkeypatch):
    require_kvm()
    monkeypatch.setenv("VMSCOPE_CACHE", str(tmp_path))
    fd, entries = _supported_cpuid()
    for e in entries:
        if e.function == 1:
            e.ecx |= xsave_probe.CPUID1_ECX_XSAVE
    assert xsave_probe.guest_xsetbv_reaches_kvm(fd, entries) is True
    kept = list((tmp_path / "host").glob("xsetbv-reaches-kvm-*"))
    assert len(kept) == 1 and kept[0].read_text() == "yes\n"
    xsave_probe.fit_cpuid_to_kvm(fd, entries)
    assert xsave_probe._has_xsave(entries), "KVM follows XCR0 here: the CPU is left as KVM offers it"
    kept[0].write_text("no\n")  # as the nested lab's KVM answers: read back, not probed again
    assert xsave_probe.guest_xsetbv_reaches_kvm(fd, entries) is False
    leaf7 = [e for e in entries if e.function == 7 and e.index == 0]  # views into the table
    for e in leaf7:
        e.ecx |= xsave_probe.CPUID7_ECX_LA57  # as QEMU's -cpu max offers it to L1's KVM
    xsave_probe.fit_cpuid_to_kvm(fd, entries)
    assert not xsave_probe._has_xsave(entries)
    assert leaf7 and not any(e.ecx & xsave_probe.CPUID7_ECX_LA57 for e in leaf7), "5-level paging hidden too"


def test_hide_xsave_clears_xsave_and_what_needs_it():
    table = (abi.KvmCpuidEntry2 * 3)()
    table[0].function, table[0].ecx = 1, 0xFFFFFFFF
    table[1].function, table[1].index = 7, 0
    table[1].ebx = table[1].ecx = table[1].edx = 0xFFFFFFFF
    table[2].function, table[2].index, table[2].eax, table[2].ebx = 0xD, 0, 0x2E7, 2696
    xsave_probe.hide_xsave(table)
    assert not table[0].ecx & (1 << 26) and not table[0].ecx & (1 << 28)  # XSAVE, AVX
    assert table[0].ecx & (1 << 0) and table[0].ecx & (1 << 31)  # SSE3, hypervisor: kept
    assert not table[1].ebx & (1 << 5) and not table[1].ebx & (1 << 16)  # AVX2, AVX-512F
    assert table[1].ebx & (1 << 0)  # FSGSBASE: kept
    assert (table[2].eax, table[2].ebx) == (0, 0)
    assert xsave_probe._has_xsave(table) is False


def test_no_xsave_means_nothing_to_probe():
    table = (abi.KvmCpuidEntry2 * 1)()
    table[0].function = 1
    assert xsave_probe.guest_xsetbv_reaches_kvm(-1, table) is True  # no VM made: fd -1 is never used


def test_hide_la57_clears_only_5_level_paging():
    table = (abi.KvmCpuidEntry2 * 3)()
    table[0].function, table[0].ecx = 1, 0xFFFFFFFF
    table[1].function, table[1].index, table[1].ecx = 7, 0, 0xFFFFFFFF
    table[2].function, table[2].index, table[2].ecx = 7, 1, 0xFFFFFFFF  # another subleaf: not LA57
    xsave_probe.hide_la57(table)
    assert table[1].ecx == 0xFFFFFFFF & ~(1 << 16)
    assert table[0].ecx == 0xFFFFFFFF and table[2].ecx == 0xFFFFFFFF
