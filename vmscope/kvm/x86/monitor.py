"""``monitor`` commands of the x86 KVM debug target."""

from __future__ import annotations

import os

from vmscope.gdbserver.target import TargetError
from vmscope.kvm import abi
from vmscope.kvm.x86.linux_support import MONITOR_HELP as LINUX_MONITOR_HELP


class X86Monitor:
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget`."""

    def monitor(self, command: str) -> str:
        words = command.split()
        if not words or words[0] == "help":
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
        cmd, args = words[0], words[1:]
        if cmd == "memory":  # guest RAM's memfd, for vmscope inspect on this host (vmscope.client.helpers.vmscope)
            mem = self.m.mem
            return f"ram gpa=0x0 size={mem.size:#x} pid={os.getpid()} fd={mem.fd} offset=0x0\n"
        if cmd in ("cpus", "translate", "regs") and not self.m.stopped:
            return f"{cmd}: the guest is running; interrupt it first (Ctrl-C)\n"
        if cmd == "cpus":
            lines = []
            for slot in self.m.vcpus:
                v = slot.vcpu
                if not slot.online:
                    lines.append(f"vCPU {v.index}: waiting for SIPI")
                    continue
                r, s = v.regs(), v.sregs()
                lines.append(f"vCPU {v.index}: {_cpu_mode(s)} rip={r.rip:#x} cr3={s.cr3:#x}")
            return "\n".join(lines) + "\n"
        if cmd == "translate":
            if len(args) != 1:
                return "usage: translate ADDR\n"
            try:
                addr = self.resolve_address(args[0])
            except ValueError as e:
                return f"translate: {e}\n"
            try:
                return f"{addr:#x} -> {self.translate(addr, 1):#x}\n"
            except TargetError as e:
                return f"translate: {e}\n"
        if cmd == "regs":
            lines = []
            for slot in self.m.vcpus:
                s = slot.vcpu.sregs()
                lines.append(
                    f"vCPU {slot.vcpu.index}: cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} "
                    f"cr4={s.cr4:#x} cr8={s.cr8:#x} efer={s.efer:#x}"
                )
            return "\n".join(lines) + "\n"
        linux = self.linux_monitor(cmd, args)
        if linux is not None:
            return linux
        return f"unknown monitor command {cmd!r}; try 'monitor help'\n"


def _cpu_mode(s: abi.KvmSregs) -> str:
    if s.efer & (1 << 10):
        return "long" if s.cs.l else "compat"
    if s.cr0 & 1:
        return "protected" + ("+paging" if s.cr0 & (1 << 31) else "")
    return "real"
