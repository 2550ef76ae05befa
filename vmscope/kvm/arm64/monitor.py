"""``monitor`` commands of the arm64 KVM debug target."""

from __future__ import annotations

from vmscope.gdbserver.toolkit import MonitorDispatch
from vmscope.kvm.arm64.kernel_entry import MONITOR_HELP as ENTRY_MONITOR_HELP
from vmscope.kvm.arm64.linux_symbols import MONITOR_HELP as LINUX_MONITOR_HELP


class Arm64Monitor(MonitorDispatch):
    """Mixin of :class:`~vmscope.kvm.arm64.target.Arm64KvmTarget`: ``monitor``
    commands (the dispatch and ``translate`` are the targets' shared ones)."""

    monitor_commands = ("cpus", "translate")
    monitor_needs_stop = frozenset({"kernel-entry"})  # reads every vCPU's pc

    def _monitor_help(self) -> str:
        return ("vmscope arm64 KVM monitor commands:\n"
                "  help             this text\n"
                "  cpus             exception level, pc, SCTLR_EL1 and TTBRs of every vCPU\n"
                "  translate ADDR   guest-virtual ADDR -> guest-physical (vCPU 0's tables)\n"
                + (LINUX_MONITOR_HELP + ENTRY_MONITOR_HELP if getattr(self.m, "linux", None) is not None else "") +
                f"debug slots: {self.m.hw_bp_slots} breakpoints, {self.m.hw_wp_slots} watchpoints\n")

    def _monitor_other(self, cmd: str, args: list[str]) -> str | None:
        return self.linux_monitor(cmd, args)  # the Linux commands (symbols), None for others

    def _monitor_cpus(self, args: list[str]) -> str:
        lines = []
        for slot in self.m.vcpus:
            v = slot.vcpu
            p = v.pstate
            lines.append(f"vCPU {v.index}: EL{(p >> 2) & 3}{'h' if p & 1 else 't'} pc={v.pc:#x} "
                         f"sctlr={v.sys('SCTLR_EL1'):#x} ttbr0={v.sys('TTBR0_EL1'):#x} "
                         f"ttbr1={v.sys('TTBR1_EL1'):#x}")
        return "\n".join(lines) + "\n"
