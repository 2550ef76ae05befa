"""Exit-storm detection: a vCPU that does nothing but touch one I/O port.

A guest spinning on a port that never gives the answer it waits for (a
status bit of a device vmscope does not emulate, say) looks to the user like
a hung VMM: each exit is cheap, so nothing else shows. The VMM counts, per
vCPU, how many exits in a row went to the same port in the same direction;
past ``limit`` it ends the guest with a report (port, vCPU registers, last
console lines) and a non-zero status. Legitimate polling ends within a few
reads because the emulated devices answer at once; interleaved ports (the
serial driver's THR writes and LSR reads) never count as one run.
"""

from __future__ import annotations

DEFAULT_LIMIT = 200_000


class ExitStormDetector:
    def __init__(self, vcpus: int, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self._last = [None] * vcpus
        self._run = [0] * vcpus

    def io(self, vcpu: int, port: int, out: bool) -> str | None:
        """Record one port exit; a description when it completes a storm."""
        key = (port, out)
        if self._last[vcpu] == key:
            self._run[vcpu] += 1
            if self._run[vcpu] == self.limit:
                verb = "writes to" if out else "reads of"
                return f"exit storm: {self.limit} {verb} port {port:#x} in a row and nothing else"
        else:
            self._last[vcpu] = key
            self._run[vcpu] = 1
        return None

    def reset(self) -> None:
        """Other accesses happened (port writes KVM queued without exits)."""
        self._last = [None] * len(self._last)
        self._run = [0] * len(self._run)
