"""``monitor`` commands of the arm64 KVM debug target."""

from __future__ import annotations

from vmscope.gdbserver.target import TargetError


class Arm64Monitor:
    """Mixin of :class:`~vmscope.kvm.arm64.target.Arm64KvmTarget`: ``monitor`` commands."""

    def monitor(self, command: str) -> str:
        words = command.split()
        if not words or words[0] == "help":
            return ("vmscope arm64 KVM monitor commands:\n"
                    "  help             this text\n"
                    "  cpus             exception level, pc, SCTLR_EL1 and TTBRs of every vCPU\n"
                    "  translate ADDR   guest-virtual ADDR -> guest-physical (vCPU 0's tables)\n"
                    f"debug slots: {self.m.hw_bp_slots} breakpoints, {self.m.hw_wp_slots} watchpoints\n")
        cmd, args = words[0], words[1:]
        if cmd == "cpus":
            lines = []
            for slot in self.m.vcpus:
                v = slot.vcpu
                p = v.pstate
                lines.append(f"vCPU {v.index}: EL{(p >> 2) & 3}{'h' if p & 1 else 't'} pc={v.pc:#x} "
                             f"sctlr={v.sys('SCTLR_EL1'):#x} ttbr0={v.sys('TTBR0_EL1'):#x} "
                             f"ttbr1={v.sys('TTBR1_EL1'):#x}")
            return "\n".join(lines) + "\n"
        if cmd == "translate":
            if len(args) != 1:
                return "usage: translate ADDR\n"
            try:
                addr = int(args[0], 0)
            except ValueError:
                return f"translate: {args[0]!r} is not a number (use 0x... for hex)\n"
            try:
                return f"{addr:#x} -> {self.translate(addr, 1):#x}\n"
            except TargetError as e:
                return f"translate: {e}\n"
        return f"unknown monitor command {cmd!r}; try 'monitor help'\n"
