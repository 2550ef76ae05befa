#!/usr/bin/env python3
"""Side-by-side: the same GDB workload against vmscope's stub and QEMU's.

Each peer boots the same demo ELF and waits for GDB; one stock ``gdb`` per
peer then, once the guest sits in its ``tick`` loop:

- single-steps N times (one ``stepi`` per GDB command): **stepi/s**
- ``dump binary memory`` of 16 MiB of guest RAM: **memory MB/s**
- continues N times to ``break tick``: **breakpoint hits/s**

and the table shows vmscope's figure over the faster QEMU mode. Numbers are
from one run on a noisy shared machine: compare within a run, not across.

    python bench/gdb_ops.py                       # x86_64: vmscope KVM vs QEMU KVM and TCG
    python bench/gdb_ops.py --arch aarch64        # vmscope emu vs qemu-system-aarch64 TCG
    python bench/gdb_ops.py --json out.json
    python bench/gdb_ops.py --guest linux         # Debian kernel in the nested lab: vmscope vs QEMU -enable-kvm
                                                  # (bench/gdb_linux.py; see its docstring)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/inspect.py would shadow the standard library

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from vmscope.guests import guest_elf  # noqa: E402

console = Console(stderr=True)

# Phase 1 (hardware breakpoint to reach the loop: it works on every peer).
GDB_SCRIPT = r"""
set pagination off
set confirm off
target remote 127.0.0.1:{port}
hbreak tick
continue
delete
python
import gdb, time
def timed(n, cmd):
    t = time.perf_counter()
    for _ in range(n):
        gdb.execute(cmd, to_string=True)
    return n / (time.perf_counter() - t)
steps = timed({steps}, "stepi")
t = time.perf_counter()
gdb.execute("dump binary memory {dump} {mem_lo:#x} {mem_hi:#x}", to_string=True)
mbps = ({mem_hi} - {mem_lo}) / (time.perf_counter() - t) / 1e6
gdb.execute("hbreak tick", to_string=True)
hits = timed({hits}, "continue")
gdb.execute("delete", to_string=True)
print("RESULT stepi_per_s=%.1f mem_MBps=%.2f hbreak_hits_per_s=%.1f" % (steps, mbps, hits))
end
detach
"""

# Phase 2, a second connection: software breakpoints (QEMU with this
# machine's software KVM reports an INT3 as an emulation failure and hangs,
# so this phase has its own time limit).
GDB_SWBREAK_SCRIPT = r"""
set pagination off
set confirm off
target remote 127.0.0.1:{port}
python
import gdb, time
gdb.execute("break tick", to_string=True)
t = time.perf_counter()
for _ in range({hits}):
    gdb.execute("continue", to_string=True)
print("RESULT bp_hits_per_s=%.1f" % ({hits} / (time.perf_counter() - t)))
gdb.execute("delete", to_string=True)
end
kill
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def peers(arch: str, elf: Path, mem_mib: int) -> dict[str, list[str]]:
    """Command lines per peer; ``{port}`` is filled in."""
    if arch == "x86_64":
        qemu = ["qemu-system-x86_64", "-kernel", str(elf), "-m", str(mem_mib), "-nodefaults", "-display", "none",
                "-serial", "null", "-S", "-gdb", "tcp:127.0.0.1:{port}"]
        out = {"vmscope (kvm)": [sys.executable, "-m", "vmscope", "run", "--accel", "kvm", "--mem", str(mem_mib),
                                 "--gdb", "127.0.0.1:{port}"]}
        if os.access("/dev/kvm", os.R_OK | os.W_OK):
            out["qemu -enable-kvm"] = qemu + ["-enable-kvm"]
        out["qemu -accel tcg"] = qemu + ["-accel", "tcg"]
        return out
    qemu = ["qemu-system-aarch64", "-M", "virt", "-cpu", "max", "-kernel", str(elf), "-m", str(mem_mib),
            "-nodefaults", "-display", "none", "-serial", "null", "-S", "-gdb", "tcp:127.0.0.1:{port}"]
    return {
        "vmscope (emu)": [sys.executable, "-m", "vmscope", "run", "--accel", "emu", "--arch", "aarch64",
                          "--mem", str(mem_mib), "--gdb", "127.0.0.1:{port}"],
        "qemu -accel tcg": qemu + ["-accel", "tcg"],
    }


def run_peer(name: str, cmd: list[str], gdb: str, elf: Path, args, mem_lo: int, mem_hi: int) -> dict:
    port = free_port()
    cmd = [c.format(port=port) for c in cmd]
    console.print(f"[bold]{name}[/]: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        wait_port(port, proc)
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "bench.gdb"
            script.write_text(GDB_SCRIPT.format(port=port, steps=args.steps, hits=args.hits, dump=Path(tmp) / "mem.bin",
                                                mem_lo=mem_lo, mem_hi=mem_hi))
            res = subprocess.run([gdb, "-q", "-nx", "-batch", "-x", str(script), str(elf)],
                                 capture_output=True, text=True, timeout=args.timeout)
            m = re.search(r"RESULT stepi_per_s=([\d.]+) mem_MBps=([\d.]+) hbreak_hits_per_s=([\d.]+)", res.stdout)
            if not m:
                raise RuntimeError(f"{name}: gdb did not finish:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
            out = {"stepi_per_s": float(m[1]), "mem_MBps": float(m[2]), "hbreak_hits_per_s": float(m[3])}
            script.write_text(GDB_SWBREAK_SCRIPT.format(port=port, hits=args.hits))
            try:
                res = subprocess.run([gdb, "-q", "-nx", "-batch", "-x", str(script), str(elf)],
                                     capture_output=True, text=True, timeout=args.swbreak_timeout)
                m = re.search(r"RESULT bp_hits_per_s=([\d.]+)", res.stdout)
                out["bp_hits_per_s"] = float(m[1]) if m else 0.0
            except subprocess.TimeoutExpired:
                out["bp_hits_per_s"] = 0.0
            if not out["bp_hits_per_s"]:
                console.print(f"[yellow]{name}: software breakpoints did not work (counted as 0)[/]")
            return out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# (label, result key, target ratio vmscope / best QEMU)
METRICS = [("stepi/s", "stepi_per_s", 2.0), ("memory MB/s", "mem_MBps", 10.0),
           ("breakpoint hits/s (break)", "bp_hits_per_s", 1.5),
           ("breakpoint hits/s (hbreak)", "hbreak_hits_per_s", 1.5)]


def _figure(value: float) -> str:
    """One decimal, or two for rates under 1/s (a crawling peer is not 0)."""
    return f"{value:.2f}" if 0 < value < 1 else f"{value:.1f}"


def print_table(title: str, results: dict[str, dict], metrics=METRICS) -> dict[str, float]:
    """One column per peer, then vmscope's figure over the best QEMU's.

    Peers whose name starts with ``vmscope`` are ours, ``qemu`` theirs; a
    QEMU figure of 0 (the operation hung or failed) gives no ratio. Returns
    the ratios by result key."""
    ours = next((v for k, v in results.items() if k.startswith("vmscope")), None)
    qemus = {k: v for k, v in results.items() if k.startswith("qemu")}
    table = Table(title=title)
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    table.add_column("ratio vs best QEMU", justify="right")
    table.add_column("target", justify="right")
    ratios = {}
    for label, key, target in metrics:
        row = [label] + [_figure(results[n].get(key, 0.0)) for n in results]
        if ours and qemus:
            best = max(v.get(key, 0.0) for v in qemus.values())
            ratios[key] = ours.get(key, 0.0) / best if best else float("inf")
            row += [f"{ratios[key]:.2f}x" if best else "QEMU failed", f"{target:.1f}x"]
        else:
            row += ["-", f"{target:.1f}x"]
        table.add_row(*row)
    Console().print(table)
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", choices=["demo", "linux"], default="demo",
                    help="demo: the bare-metal demo ELF on this host; linux: Debian's kernel in the nested lab")
    ap.add_argument("--arch", choices=["x86_64", "aarch64"], default="x86_64")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--hits", type=int, default=200)
    ap.add_argument("--dump-mib", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600, help="seconds for a peer's main gdb run")
    ap.add_argument("--swbreak-timeout", type=float, default=120, help="seconds for the software-breakpoint run")
    ap.add_argument("--json", type=Path)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--guest")
    if pre.parse_known_args(argv)[0].guest == "linux":  # its own options and defaults (a lab, slower peers)
        from bench import gdb_linux

        return gdb_linux.main(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)

    elf = guest_elf("demo", args.arch)
    gdb = shutil.which("gdb" if args.arch == "x86_64" else "gdb-multiarch")
    base = 0x100000 if args.arch == "x86_64" else 0x40000000
    mem_mib = max(64, args.dump_mib + 16)
    results = {}
    for name, cmd in peers(args.arch, elf, mem_mib).items():
        try:
            results[name] = run_peer(name, cmd, gdb, elf, args, base, base + args.dump_mib * 1024 * 1024)
        except Exception as e:  # one failed peer should not hide the others
            console.print(f"[red]{name} failed:[/] {e}")
    title = (f"gdb operations, {args.arch} demo guest ({args.steps} stepi, {args.dump_mib} MiB dump, "
             f"{args.hits} breakpoint hits)")
    ratios = print_table(title, results, METRICS)
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "results": results, "ratios": ratios}, indent=2))
    return 0 if any(k.startswith("vmscope") for k in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
