#!/usr/bin/env python3
"""Probe loop cost: vmscope's probes (shared RAM and pure RSP) beside a stock
gdb whose breakpoint ``commands`` block does the same reads, on the same
QEMU guest in one run.

The guest (Debian's cloud kernel, ``qemu-system-x86_64 -accel tcg``, KASLR
on) runs a shell loop that opens a file without forking (``read < FILE``),
so hits come as fast as the debugger lets the guest go and the debugger's
cost per hit is what is measured. At each hit every contender reads the
current task (per-CPU ``current_task`` through the GS base), its pid and
comm, the syscall's ``pt_regs`` and the file name (a user string).

Prints, per contender: hits/s, ms per hit, and for vmscope the time spent
in the callback (the introspection: task, arguments, user string) apart
from the breakpoint round trips. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from vmscope.client.helpers.qemu_launch import QemuGuest  # noqa: E402
from vmscope.client.session import Inspector  # noqa: E402

OPENAT = "__x64_sys_openat"
LOOP = "(while :; do read x < /etc/passwd; done) & echo $! > /tmp/bench-loop.pid"


def vmscope_probe(vm: QemuGuest, memory: str, hits: int, introspect: bool = True) -> dict:
    spent: list[float] = []
    times: list[float] = []
    names: list[str] = []
    waited = [0.0]
    with Inspector(vm.gdb, vm.qmp, memory=memory, timeout=30) as ins:
        kernel = ins.kernel()
        # One-time costs out of the timing: parsing the kernel's BTF (seconds
        # on a busy host) and resolving the fields a hit reads.
        kernel.task_from_address(kernel.current_task(ins.client.registers()))
        kernel.process_address_space(kernel.find_task(1))
        wait = ins.client.wait

        def timed_wait(timeout=None):  # the time the guest runs is not the debugger's
            t = time.perf_counter()
            try:
                return wait(timeout)
            finally:
                waited[0] += time.perf_counter() - t
        ins.client.wait = timed_wait

        @ins.probe(OPENAT)
        def opened(hit):
            t = time.perf_counter()
            if introspect:
                task = hit.task
                names.append(f"{task.pid} {task.comm} {hit.user_string(hit.args['filename'])}")
            spent.append(time.perf_counter() - t)
            times.append(t)

        result = ins.run(hits=hits, seconds=120)
    n = len(times)
    rate = (n - 1) / (times[-1] - times[0]) if n > 1 else 0.0
    return {"hits": n, "hits_per_s": rate, "ms_per_hit": 1e3 / rate if rate else None,
            "introspection_ms": 1e3 * statistics.median(spent) if n else None,  # the first hit also resolves layouts
            "debugger_ms": 1e3 * (result.seconds - waited[0]) / n if n else None,
            "sample": names[-1] if names else ""}


def gdb_commands(k, hits: int) -> list[str]:
    """A breakpoint and a ``commands`` block reading what a probe reads."""
    cur = k.symbols["current_task"] if "current_task" in k.symbols else \
        k.address_of("pcpu_hot") + k.btf.offsetof("pcpu_hot", "current_task")
    pid = k.btf.offsetof("task_struct", "pid")
    comm = k.btf.offsetof("task_struct", "comm")
    si = k.btf.offsetof("pt_regs", "si")
    return ["set $n = 0", f"break *{k.address_of(OPENAT):#x}", "commands", "silent", "set $n = $n + 1",
            f"set $t = *(unsigned long *)($gs_base + {cur:#x})",
            f'printf "hit %d %s %s\\n", *(int *)($t + {pid}), (char *)($t + {comm}), '
            f"*(char **)($rdi + {si})",
            f"if $n >= {hits}", "delete", "detach", "quit", "end", "continue", "end"]


def stock_gdb(vm: QemuGuest, commands: list[str]) -> dict:
    script = "\n".join(commands) + "\n"
    path = f"/tmp/vmscope-bench-probe-{os.getpid()}.gdb"
    with open(path, "w") as f:
        f.write(script)
    import pexpect

    # On a pty, as a user runs it: through a pipe gdb buffers its output and
    # the lines (our clock) would arrive in bursts.
    gdb = pexpect.spawn("gdb", ["-nx", "-batch", "-ex", "set confirm off", "-ex", "set pagination off",
                                "-ex", f"target remote {vm.gdb}", "-x", path, "-ex", "continue"],
                        encoding="utf-8", timeout=180)
    times, last = [], ""
    while True:
        try:
            line = gdb.readline()
        except pexpect.TIMEOUT:
            break
        if not line:
            break
        if line.startswith("hit "):
            times.append(time.perf_counter())
            last = line.strip()
    gdb.close()
    os.unlink(path)
    n = len(times)
    rate = (n - 1) / (times[-1] - times[0]) if n > 1 else 0.0
    return {"hits": n, "hits_per_s": rate, "ms_per_hit": 1e3 / rate if rate else None, "sample": last}


def run(hits: int, rounds: int = 3) -> dict:
    from vmscope.images.linux import READY_MARKER, build_linux_guest
    from tests.support import free_port

    image = build_linux_guest(mode="shell", quiet=True)
    out: dict = {}
    with QemuGuest(str(image.vmlinuz), str(image.initramfs), free_port(), free_port()) as vm:
        vm.console.wait_for(READY_MARKER.encode())
        vm.console.run(LOOP)
        with Inspector(vm.gdb, vm.qmp, timeout=30) as ins:
            commands = gdb_commands(ins.kernel(), hits)  # addresses and offsets of this boot, for gdb
        contenders = {
            "vmscope, no reads": lambda: vmscope_probe(vm, "shared", hits, introspect=False),
            "vmscope, shared RAM": lambda: vmscope_probe(vm, "shared", hits),
            "vmscope, pure RSP": lambda: vmscope_probe(vm, "rsp", hits),
            "gdb + commands": lambda: stock_gdb(vm, commands),
        }
        # Rounds interleave the contenders, so a busy host or a guest that
        # slows down weighs on all alike; each number is the median round.
        rows: dict[str, list[dict]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                rows[name].append(fn())
        for name, runs in rows.items():
            runs.sort(key=lambda r: r["hits_per_s"])
            out[name] = runs[len(runs) // 2]
        vm.console.run("kill $(cat /tmp/bench-loop.pid)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hits", type=int, default=100, help="hits per round (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each contender once per round (default 3)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = run(args.hits, args.rounds)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    for name, row in r.items():
        extra = ""
        if row.get("debugger_ms") is not None:
            extra = f"  debugger {row['debugger_ms']:6.2f} ms/hit, of it introspection {row['introspection_ms']:.3f} ms"
        print(f"{name:<20} {row['hits']:4d} hits {row['hits_per_s']:7.1f} hits/s {row['ms_per_hit'] or 0:7.2f} ms/hit"
              f"{extra}   e.g. {row['sample']!r}")
    g, s = r["gdb + commands"], r["vmscope, shared RAM"]
    if g["hits_per_s"] and s["hits_per_s"]:
        print(f"hits/s, vmscope with shared RAM over gdb: {s['hits_per_s'] / g['hits_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
