"""Does this KVM see the guest's ``XSETBV``? Hide XSAVE from the guest if not.

KVM keeps its own copy of the guest's XCR0: it loads it before every entry
and sizes CPUID leaf 0xD (the XSAVE area a kernel allocates) from it. On
real hardware every ``XSETBV`` in a guest exits to KVM, which updates the
copy. QEMU's TCG does not apply SVM's XSETBV intercept, so under the nested
lab (L1's KVM on QEMU's emulated SVM) the guest's ``XSETBV`` goes straight
to the emulated CPU: KVM's copy stays at reset (x87 only) and overwrites the
guest's XCR0 at the next entry. Linux then warns "XSAVE consistency problem:
size 2696 != kernel_size 576" at every boot and, depending on where its
XSAVE buffers land, later hangs, triple-faults, or corrupts L1 itself
(measured in docs/kvm-notes.md).

:func:`guest_xsetbv_reaches_kvm` runs four instructions in a throwaway VM
(``XSETBV`` to x87+SSE, ``HLT``) and asks KVM for the XCR0 it saw. When
KVM did not see it, :func:`hide_xsave` takes XSAVE and what needs it (AVX,
AVX2, AVX-512, FMA, F16C, leaf 0xD) out of every guest's CPUID
(:func:`fit_cpuid_to_kvm`), as QEMU's default CPU model does: Linux then
uses FXSAVE and boots cleanly. The answer is kept per host boot (it
depends on the host, not on the guest).

The same answer says the KVM runs on QEMU TCG's emulated SVM, where a guest
on 5-level page tables also dies at random; :func:`hide_la57` takes that
feature out too (QEMU's default model lacks it as well).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

from vmscope.kvm import abi
from vmscope.kvm.abi import ioctl

log = logging.getLogger(__name__)

CR4_OSXSAVE = 1 << 18
CPUID1_ECX_FMA, CPUID1_ECX_XSAVE, CPUID1_ECX_AVX, CPUID1_ECX_F16C = 1 << 12, 1 << 26, 1 << 28, 1 << 29
# leaf 7 subleaf 0: AVX2 and the AVX-512 family (all need XSAVE-managed state)
CPUID7_EBX_AVX = (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31)
CPUID7_ECX_AVX = (1 << 1) | (1 << 6) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14)
CPUID7_EDX_AVX = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23)
CPUID7_ECX_LA57 = 1 << 16  # 5-level paging

# real mode at 0x1000: mov eax, 3; xor edx, edx; xor ecx, ecx; xsetbv; hlt
PROBE_CODE = bytes.fromhex("66b803000000" "6631d2" "6631c9" "0f01d1" "f4")
PROBE_XCR0 = 0x3
PROBE_AT = 0x1000


def fit_cpuid_to_kvm(kvm_fd: int, entries) -> None:
    """Where KVM cannot follow the guest's XCR0 (the signature of QEMU
    TCG's emulated SVM), hide XSAVE and 5-level paging from every guest
    (Linux or not); leave the table alone everywhere else."""
    if not guest_xsetbv_reaches_kvm(kvm_fd, entries):
        hide_xsave(entries)
        hide_la57(entries)
        log.info("this KVM does not see the guest's XSETBV (QEMU TCG's emulated SVM): XSAVE, AVX and "
                 "5-level paging are hidden from the guest, which then uses FXSAVE and 4-level page "
                 "tables (docs/kvm-notes.md)")


def _has_xsave(entries) -> bool:
    return any(e.function == 1 and e.ecx & CPUID1_ECX_XSAVE for e in entries)


def guest_xsetbv_reaches_kvm(kvm_fd: int, entries) -> bool:
    """True when KVM saw a guest ``XSETBV`` (or there is no XSAVE to probe);
    the answer is cached for this host boot."""
    if not _has_xsave(entries):
        return True
    cached = _cache_file()
    if cached is not None and cached.exists():
        return cached.read_text().strip() == "yes"
    try:
        seen = _probe(kvm_fd, entries)
    except OSError as e:  # a KVM that cannot run the probe: keep the CPU as KVM offers it
        log.debug("XSETBV probe could not run (%s); XSAVE left as KVM reports it", e)
        return True
    if cached is not None:
        try:
            cached.write_text("yes\n" if seen else "no\n")
        except OSError:
            pass
    return seen


def hide_xsave(entries) -> None:
    """Take XSAVE and the features built on it out of a CPUID table, in place."""
    for e in entries:
        if e.function == 1:
            e.ecx &= ~(CPUID1_ECX_XSAVE | CPUID1_ECX_AVX | CPUID1_ECX_FMA | CPUID1_ECX_F16C)
        elif e.function == 7 and e.index == 0:
            e.ebx &= ~CPUID7_EBX_AVX
            e.ecx &= ~CPUID7_ECX_AVX
            e.edx &= ~CPUID7_EDX_AVX
        elif e.function == 0xD:
            e.eax = e.ebx = e.ecx = e.edx = 0


def hide_la57(entries) -> None:
    """Take 5-level paging (LA57) out of a CPUID table, in place.

    Why: QEMU's ``-cpu max`` offers LA57, so L1's KVM passes it on and
    Linux's decompressor switches the guest to 5-level paging. Under QEMU
    TCG's emulated SVM such a guest dies at random (measured in the lab,
    2 vCPUs, KASLR on: 4 of 22 boots ended in a triple fault or a stall;
    0 of 12 with ``no5lvl``, 0 of 8 with ``nokaslr``; docs/kvm-notes.md).
    QEMU's own default CPU model has no LA57, and a guest of a few GiB
    gains nothing from 57-bit addresses."""
    for e in entries:
        if e.function == 7 and e.index == 0:
            e.ecx &= ~CPUID7_ECX_LA57


def _cache_file() -> Path | None:
    """Where this host boot's answer is kept; None where it cannot be (no
    boot id, no writable cache): the probe then runs at every start."""
    from vmscope.images.cache import cache_dir

    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return cache_dir("host") / f"xsetbv-reaches-kvm-{boot_id}"
    except OSError:
        return None


def _probe(kvm_fd: int, entries) -> bool:
    from vmscope.kvm.x86.vcpu import Vcpu

    vm_fd = ioctl(kvm_fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
    ram = mmap.mmap(-1, 0x2000, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vcpu = None
    try:
        ram[PROBE_AT:PROBE_AT + len(PROBE_CODE)] = PROBE_CODE
        view = ctypes.c_char.from_buffer(ram)
        addr = ctypes.addressof(view)
        del view  # only the address is needed: the mapping must stay closable
        ioctl(vm_fd, abi.KVM_SET_USER_MEMORY_REGION,
              abi.KvmUserspaceMemoryRegion(slot=0, flags=0, guest_phys_addr=0, memory_size=0x2000,
                                           userspace_addr=addr), "KVM_SET_USER_MEMORY_REGION")
        mmap_size = ioctl(kvm_fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        vcpu = Vcpu(vm_fd, 0, mmap_size)
        vcpu.set_cpuid(entries)
        s = vcpu.sregs()
        s.cs.base, s.cs.selector = 0, 0
        s.cr4 |= CR4_OSXSAVE
        vcpu.set_sregs(s)
        r = vcpu.regs()
        r.rip, r.rflags = PROBE_AT, 0x2
        vcpu.set_regs(r)
        for _ in range(4):  # HLT is the only exit the probe makes; a signal may interrupt once
            if vcpu.enter():
                break
        if vcpu.run.exit_reason != abi.KVM_EXIT_HLT:
            raise OSError(f"probe ended with KVM exit {vcpu.run.exit_reason}, not HLT")
        xcrs = abi.KvmXcrs()
        ioctl(vcpu.fd, abi.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        xcr0 = next((x.value for x in xcrs.xcrs[:xcrs.nr_xcrs] if x.xcr == 0), None)
        log.debug("XSETBV probe: the guest set XCR0=%#x, KVM holds %s", PROBE_XCR0,
                  "nothing" if xcr0 is None else hex(xcr0))
        return xcr0 == PROBE_XCR0
    finally:
        if vcpu is not None:
            vcpu.close()
        os.close(vm_fd)
        ram.close()

