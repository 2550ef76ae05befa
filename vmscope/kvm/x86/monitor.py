"""``monitor`` commands of the x86 KVM debug target."""

from __future__ import annotations

import os

from vmscope.gdbserver.toolkit import MonitorDispatch
from vmscope.kvm import abi
from vmscope.kvm.x86.linux_support import MONITOR_HELP as LINUX_MONITOR_HELP


class X86Monitor(MonitorDispatch):
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget` (the dispatch
    and ``translate`` are the targets' shared ones)."""

    monitor_commands = ("memory", "cpus", "translate", "regs", "dump")
    monitor_needs_stop = frozenset({"cpus", "translate", "regs", "dump"})

    def _monitor_help(self) -> str:
        return (
            "vmscope KVM monitor commands:\n"
            "  help             this text\n"
            "  cpus             mode, rip and cr3 of every vCPU\n"
            "  translate ADDR   guest-virtual ADDR (a number, or a kernel symbol[+off]) -> guest-physical\n"
            "  regs             control registers and EFER of every vCPU\n"
            "  memory           guest RAM's memfd (pid, fd) for vmscope inspect\n"
            "  dump PATH        write guest RAM and every vCPU as an ELF core (QEMU's dump-guest-memory format),\n"
            "                   on the VMM's host; vmscope inspect --core PATH reads it\n"
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

    def _monitor_dump(self, args: list[str]) -> str:
        """``monitor dump PATH``: the stopped guest as an ELF core, written by
        the VMM itself from its RAM (no copy over the wire): RAM, each vCPU's
        registers with its control registers, and the Linux kernel's
        VMCOREINFO when there is one (as ``vmscope dump`` writes)."""
        if len(args) != 1:
            return "usage: dump PATH\n"
        import time

        from vmscope.dump.elfcore import DumpPlan, write_core

        t0 = time.monotonic()
        cpus = []
        for tid in self.threads():
            regs = dict(self.read_registers(tid))
            cpus.append({k: v for k, v in regs.items() if isinstance(v, int)})
        plan = DumpPlan("x86_64", [(0, self.m.mem.size)], cpus, self._dump_vmcoreinfo(cpus))
        try:
            with open(args[0], "wb") as f:
                write_core(f, plan, self.m.mem.read)
        except OSError as e:
            return f"dump: {args[0]}: {e.strerror or e}\n"
        return (f"dump: wrote {args[0]}: {plan.ram_bytes >> 20} MiB of RAM, {len(cpus)} vCPUs, "
                f"{'VMCOREINFO' if plan.vmcoreinfo else 'no VMCOREINFO (not a Linux guest)'}; "
                f"{time.monotonic() - t0:.1f} s\n")

    def _dump_vmcoreinfo(self, cpus: list[dict[str, int]]) -> bytes | None:
        """The guest kernel's VMCOREINFO, read from RAM as vmscope dump does;
        None when no vCPU runs a Linux kernel."""
        from types import SimpleNamespace

        from vmscope.dump.take import guest_vmcoreinfo
        from vmscope.vmi.errors import VmiError
        from vmscope.vmi.linux.kernel import LinuxKernel
        from vmscope.vmi.memory import BytesMemory

        phys = BytesMemory(self.m.mem.view)
        for regs in cpus:
            if not regs.get("efer", 0) & (1 << 10) or not regs.get("cr3"):
                continue
            try:
                kernel = LinuxKernel(phys, regs["cr3"], regs.get("cr4", 0))
            except VmiError:
                continue
            return guest_vmcoreinfo(SimpleNamespace(kernel=lambda: kernel))
        return None


def _cpu_mode(s: abi.KvmSregs) -> str:
    if s.efer & (1 << 10):
        return "long" if s.cs.l else "compat"
    if s.cr0 & 1:
        return "protected" + ("+paging" if s.cr0 & (1 << 31) else "")
    return "real"
