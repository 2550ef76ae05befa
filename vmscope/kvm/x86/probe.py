"""Measure, once per process, which debug mechanisms this host's KVM serves.

Why: the same VMM runs on hardware KVM, on PVM (software KVM, where ring-0
code goes through KVM's emulator) and on KVM nested under QEMU's TCG SVM
(the lab), and each fails differently: PVM reports INT3 as an emulation
failure and never fires data watchpoints for emulated stores; TCG's SVM
may not route debug-register hits to the L1 hypervisor. Rather
than guess from CPU flags, a throwaway VM with one page of real-mode code
tries each mechanism (a few milliseconds):

- ``dr_write_watch``: a DR0 write watchpoint on a store -> KVM_EXIT_DEBUG?
- ``dr_exec``: a DR0 execution breakpoint -> KVM_EXIT_DEBUG?
- ``int3``: how an INT3 under KVM_GUESTDBG_USE_SW_BP arrives, probed in
  32-bit protected mode with an IDT (PVM runs a real-mode INT3 through the
  IVT, unlike ring-0 protected-mode code): ``"debug"`` (hardware KVM),
  ``"emulation-failure"`` (PVM) or ``"guest"`` (not intercepted: the
  guest's own #BP handler ran).
"""

from __future__ import annotations

import functools
import mmap
import os
from dataclasses import dataclass

from vmscope.kvm import abi
from vmscope.kvm.abi import ioctl

CODE_ADDR, DATA_ADDR, BP_HANDLER, IDT, GDT = 0x1000, 0x2000, 0x1100, 0x3000, 0x3800
INT3_HLT = bytes.fromhex("ccf4")
# 32-bit interrupt gate for vector 3 -> 0x10:BP_HANDLER, and a flat code segment 0x10
BP_GATE = BP_HANDLER.to_bytes(2, "little") + b"\x10\x00\x00\x8e\x00\x00"
CODE32_DESC = bytes.fromhex("ffff0000009acf00")
# mov %al,0x2000 (real mode: a2 00 20); hlt
STORE_HLT = bytes.fromhex("a20020f4")


@dataclass(frozen=True)
class KvmDebugCaps:
    dr_write_watch: bool
    dr_exec: bool
    int3: str = "unknown"  # "debug" | "emulation-failure" | "guest" | "unknown"


def _run_once(kvm: int, code: bytes, control: int, dr: tuple[int, ...], protected: bool = False) -> tuple[int, int]:
    """Run ``code`` at CODE_ADDR in real mode; (exit reason, debug exception or -1)."""
    vm = ioctl(kvm, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
    fds = [vm]
    ram = mmap.mmap(-1, 0x4000)
    try:
        try:
            ioctl(vm, abi.KVM_SET_TSS_ADDR, 0xFFFBD000, "KVM_SET_TSS_ADDR")
        except OSError:
            pass
        ram[CODE_ADDR : CODE_ADDR + len(code)] = code
        ram[BP_HANDLER] = 0xF4  # hlt: where an unintercepted INT3 lands
        ram[IDT + 3 * 8 : IDT + 4 * 8] = BP_GATE
        ram[GDT + 0x10 : GDT + 0x18] = CODE32_DESC
        import ctypes

        anchor = ctypes.c_char.from_buffer(ram)
        region = abi.KvmUserspaceMemoryRegion(slot=0, guest_phys_addr=0, memory_size=0x4000, userspace_addr=ctypes.addressof(anchor))
        del anchor
        ioctl(vm, abi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        from vmscope.kvm.x86.vcpu import Vcpu

        size = ioctl(kvm, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        v = Vcpu(vm, 0, size)
        fds.append(v.fd)
        try:
            s = v.sregs()
            for seg in (s.cs, s.ds, s.es, s.ss):
                seg.base, seg.selector = 0, 0
            if protected:
                for seg in (s.cs, s.ds, s.es, s.ss):
                    seg.limit, seg.db, seg.g, seg.s, seg.present = 0xFFFFFFFF, 1, 1, 1, 1
                s.cs.selector, s.cs.type = 0x10, 0xB
                for seg in (s.ds, s.es, s.ss):
                    seg.selector, seg.type = 0x18, 0x3
                s.idt.base, s.idt.limit = IDT, 8 * 4 - 1
                s.gdt.base, s.gdt.limit = GDT, 0x20 - 1
                s.cr0 = 0x11
            v.set_sregs(s)
            v.set_regs(abi.KvmRegs(rip=CODE_ADDR, rflags=2, rsp=0x3000))
            v.set_guest_debug(control, dr)
            for _ in range(4):
                if v.enter():
                    break
            reason = v.run.exit_reason
            exc = v.run.exit.debug.exception if reason == abi.KVM_EXIT_DEBUG else -1
            return reason, exc
        finally:
            fds.pop()
            v.close()
    finally:
        for fd in fds:
            os.close(fd)
        try:
            ram.close()
        except BufferError:
            pass


@functools.lru_cache(maxsize=1)
def probe(kvm_fd: int | None = None) -> KvmDebugCaps:
    """Probe /dev/kvm (or the given fd); cached for the process."""
    own = kvm_fd is None
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC) if own else kvm_fd
    en = abi.KVM_GUESTDBG_ENABLE
    try:
        dr7_write = 1 | (0b01 << 16)  # L0, write, 1 byte
        reason, _ = _run_once(kvm, STORE_HLT, en | abi.KVM_GUESTDBG_USE_HW_BP, (DATA_ADDR, 0, 0, 0, 0, 0, 0, dr7_write))
        dr_write = reason == abi.KVM_EXIT_DEBUG
        reason, _ = _run_once(kvm, STORE_HLT, en | abi.KVM_GUESTDBG_USE_HW_BP, (CODE_ADDR + 3, 0, 0, 0, 0, 0, 0, 1))
        dr_exec = reason == abi.KVM_EXIT_DEBUG
        reason, exc = _run_once(kvm, INT3_HLT, en | abi.KVM_GUESTDBG_USE_SW_BP, (0,) * 8, protected=True)
        if reason == abi.KVM_EXIT_DEBUG and exc == 3:
            int3 = "debug"
        elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
            int3 = "emulation-failure"
        elif reason == abi.KVM_EXIT_HLT:
            int3 = "guest"
        else:
            int3 = f"unknown (exit {abi.EXIT_NAMES.get(reason, reason)})"
        return KvmDebugCaps(dr_write, dr_exec, int3)
    finally:
        if own:
            os.close(kvm)


if __name__ == "__main__":
    print(probe())
