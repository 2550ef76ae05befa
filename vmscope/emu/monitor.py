"""``monitor`` commands of the emulated target."""

from __future__ import annotations

from vmscope.gdbserver.toolkit import MonitorDispatch


class EmuMonitor(MonitorDispatch):
    """Mixin of :class:`~vmscope.emu.target.EmuTarget` (the dispatch and
    ``translate`` are the targets' shared ones)."""

    monitor_commands = ("cpus", "translate")
    monitor_translate_label = "physical "

    def _monitor_help(self) -> str:
        return (
            "vmscope emulated target (Unicorn), monitor commands:\n"
            "  help             this text\n"
            "  cpus             each vCPU: thread id, pc, state\n"
            "  translate ADDR   guest-virtual to guest-physical (current thread 1)\n"
        )

    def _monitor_cpus(self, args: list[str]) -> str:
        lines = []
        for cpu in self.cpus:
            state = "running" if self._running else ("halted" if cpu.halted else "stopped")
            pc = "?" if self._running else f"{cpu.pc:#x}"
            lines.append(f"  thread {cpu.tid}: vcpu {cpu.index} pc={pc} {state}")
        return f"{len(self.cpus)} vCPU(s), {self.arch.name}, emulated by Unicorn\n" + "\n".join(lines) + "\n"
