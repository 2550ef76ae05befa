"""``monitor`` commands of the x86 KVM debug target."""

from __future__ import annotations

import os

from vmscope.gdbserver.toolkit import MonitorDispatch
from vmscope.kvm import abi
from vmscope.kvm.x86.linux_support import MONITOR_HELP as LINUX_MONITOR_HELP


class X86Monitor(MonitorDispatch):
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget` (the dispatch
    and ``translate`` are the targets' shared ones)."""

    monitor_commands = ("memory", "cpus", "translate", "regs")
    monitor_needs_stop = frozenset({"cpus", "translate", "regs"})

    def _monitor_help(self) -> str:
        return (
            "vmscope KVM monitor commands:\n"
            "  help             this text\n"
            "  cpus             mode, rip and cr3 of every vCPU\n"
            "  translate ADDR   guest-virtual ADDR (a number, or a kernel symbol[+off]) -> guest-physical\n"
            "  regs             control registers and EFER of every vCPU\n"
            "  memory           guest RAM's memfd (pid, fd) for vmscope inspect\n"
            + LINUX_MONITOR_HELP +
            f"watchpoints: {'debug registers, then ' if self.dr_watch else ''}page protection\n"
        )

    def _monitor_guest_running(self) -> bool:
        return not self.m.stopped

    def _monitor_address(self, text: str) -> int:
        return self.resolve_address(text)

    def _monitor_memory(self, args: list[str]) -> str:
        """Guest RAM's memfd, for vmscope inspect on this host (vmscope.client.helpers.vmscope)."""
        mem = self.m.mem
        return f"ram gpa=0x0 size={mem.size:#x} pid={os.getpid()} fd={mem.fd} offset=0x0\n"

    def _monitor_cpus(self, args: list[str]) -> str:
        lines = []
        for slot in self.m.vcpus:
            v = slot.vcpu
            if not slot.online:
                lines.append(f"vCPU {v.index}: waiting for SIPI")
                continue
            r, s = v.regs(), v.sregs()
            lines.append(f"vCPU {v.index}: {_cpu_mode(s)} rip={r.rip:#x} cr3={s.cr3:#x}")
        return "\n".join(lines) + "\n"

    def _monitor_regs(self, args: list[str]) -> str:
        lines = []
        for slot in self.m.vcpus:
            s = slot.vcpu.sregs()
            lines.append(
                f"vCPU {slot.vcpu.index}: cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} "
                f"cr4={s.cr4:#x} cr8={s.cr8:#x} efer={s.efer:#x}"
            )
        return "\n".join(lines) + "\n"

    def _monitor_other(self, cmd: str, args: list[str]) -> str | None:
        return self.linux_monitor(cmd, args)


def _cpu_mode(s: abi.KvmSregs) -> str:
    if s.efer & (1 << 10):
        return "long" if s.cs.l else "compat"
    if s.cr0 & 1:
        return "protected" + ("+paging" if s.cr0 & (1 << 31) else "")
    return "real"
