"""Measure vmscope's arm64 KVM back end in the arm64 nested lab.

``python3 bench/arm64_nested.py`` boots the lab (qemu-system-aarch64 TCG,
Debian's arm64 kernel at EL2), starts ``python3 -m vmscope.kvm.arm64 --gdb``
in L1 and prints one JSON line: L1 boot time, then stepi/s, breakpoint
hits/s and ``g`` round trips/s measured twice: with vmscope's own client
inside L1 (loopback: the stub's cost) and with the host's gdb-multiarch
through the lab's port forward (what a user sees; every packet crosses
QEMU's user-mode network). Host ports come from 17000-17999.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

# the repo root instead of bench/ (whose inspect.py would shadow the stdlib's)
sys.path[0] = str(Path(__file__).resolve().parents[1])

GUEST_PORT = 5555
IN_L1 = r"""
import json, time
from vmscope.client.client import Client
c = Client.connect(("127.0.0.1", 5555), timeout=60)
tick = 0x40080038
out = {}
t0 = time.monotonic()
for _ in range(200):
    c.step(tid=1, timeout=60)
out["client_stepi_per_s"] = 200 / (time.monotonic() - t0)
t0 = time.monotonic()
for _ in range(200):
    c.registers()
out["client_g_per_s"] = 200 / (time.monotonic() - t0)
c.set_breakpoint(tick)
t0 = time.monotonic()
for _ in range(20):
    c.cont(timeout=60)  # steps off the breakpoint first, as gdb does
out["client_break_hits_per_s"] = 20 / (time.monotonic() - t0)
c.remove_breakpoint(tick)
c.detach()
print(json.dumps(out))
"""


def main() -> int:
    from vmscope.guests import guest_elf
    from vmscope.lab import Lab

    result: dict[str, float] = {}
    t0 = time.monotonic()
    with Lab(arch="aarch64", cpus=2, mem_mib=2048, forward=[GUEST_PORT], port_range=(17000, 17999),
             boot_timeout=900) as lab:
        result["lab_start_s"] = time.monotonic() - t0
        result.update({f"lab_{k}": v for k, v in lab.timings.items()})
        cmd = f"cd /opt/vmscope/src && exec python3 -m vmscope.kvm.arm64 --cpus 2 --gdb 0.0.0.0:{GUEST_PORT}"
        with lab.spawn(cmd) as vm:
            vm.wait_for_output("waiting for gdb", timeout=300)
            r = lab.python(IN_L1, timeout=900, check=True)
            result.update(json.loads(r.stdout.strip().splitlines()[-1]))
        with lab.spawn(cmd) as vm:
            vm.wait_for_output("waiting for gdb", timeout=300)
            port = lab.host_port(GUEST_PORT)
            script = ["-ex", "set pagination off", "-ex", f"target remote 127.0.0.1:{port}",
                      "-ex", "python import time; t0 = time.monotonic()",
                      "-ex", "stepi 100",
                      "-ex", "python print('STEPI', time.monotonic() - t0)",
                      "-ex", "break tick",
                      "-ex", "python t0 = time.monotonic()"]
            script += ["-ex", "continue"] * 10
            script += ["-ex", "python print('BREAK', time.monotonic() - t0)", "-ex", "kill"]
            out = subprocess.run(["gdb-multiarch", "-q", "-nx", "-batch", *script, str(guest_elf("demo", "aarch64"))],
                                 capture_output=True, text=True, timeout=900).stdout
            step = re.search(r"STEPI ([\d.]+)", out)
            brk = re.search(r"BREAK ([\d.]+)", out)
            if step:
                result["gdb_stepi_per_s"] = 100 / float(step.group(1))
            if brk:
                result["gdb_break_hits_per_s"] = 10 / float(brk.group(1))
    print(json.dumps({k: round(v, 2) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
