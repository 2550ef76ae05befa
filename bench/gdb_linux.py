#!/usr/bin/env python3
"""gdb on a live Linux kernel: vmscope's stub vs QEMU's, both on KVM in the nested lab.

``python bench/gdb_ops.py --guest linux`` (this file) boots one lab (L1 with
real KVM) and in it, one after the other, Debian's cloud kernel with the
busybox initramfs (KASLR on, same vCPUs and memory) under

- ``vmscope run --accel kvm --gdb`` and
- the host's ``qemu-system-x86_64 -enable-kvm -gdb tcp::PORT`` (carried into
  L1 as bench/linux_boot.py does).

Once a guest prints ``vmscope-linux-ready``, its shell starts one loop per
vCPU that makes the openat syscall over and over (``cat /proc/version``), the
kernel's own ``/proc/kallsyms`` gives the relocated addresses, and stock gdb
on the host, through a forwarded port, measures in separate connections:

- **stepi/s in kernel code**: reconnect until a vCPU is stopped in the kernel
  (not on an idle ``hlt``), then ``stepi`` N times (one gdb command each);
- **memory MB/s**: ``dump binary memory`` of M MiB of kernel text from ``_text``;
- **breakpoint hits/s**: N ``continue``s to ``hbreak``, then ``break``, on
  ``__x64_sys_openat`` (paced by the workload as much as by the stub).

Each connection has its own time limit: in the lab, an INT3 or a debug
register hit in L2 does not reach L1's KVM (L0 is QEMU TCG emulating SVM),
so QEMU's KVM_SET_GUEST_DEBUG breakpoints may never report; a phase that
times out or stops elsewhere counts as 0 and the notes below the table say
what happened. vmscope uses page-protection breakpoints there.

    python bench/gdb_ops.py --guest linux [--steps 500] [--hits 30] [--dump-mib 8] [--json out.json]

Numbers are from one run on a noisy machine, with L1 itself emulated: compare
within a run, not across.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/inspect.py would shadow the standard library

from rich.console import Console  # noqa: E402

from bench.gdb_ops import print_table  # noqa: E402
from bench.linux_boot import QEMU_DIR, qemu_files  # noqa: E402

console = Console(stderr=True)

HOST_PORTS = (24000, 24199)
VMSCOPE_PORT, QEMU_PORT = 24500, 24501  # in L1
READY = "vmscope-linux-ready"
CMDLINE = "console=ttyS0 quiet panic=-1"
SYMBOLS = ("_text", "_etext", "__x64_sys_openat")
# `vmscope run` on a pty, so it forwards what we type to the guest's COM1
PTY = ["python3", "-c", "import pty, sys; sys.exit(pty.spawn(sys.argv[1:]) >> 8)"]

METRICS = [("stepi/s (kernel code)", "stepi_per_s", 2.0), ("memory MB/s (kernel text)", "mem_MBps", 10.0),
           ("breakpoint hits/s (break)", "bp_hits_per_s", 1.5),
           ("breakpoint hits/s (hbreak)", "hbreak_hits_per_s", 1.5)]

PRELUDE = """\
set pagination off
set confirm off
set architecture i386:x86-64
target remote 127.0.0.1:{port}
"""

# Lines for the bench go to a file as well as to gdb's output: a gdb killed
# at its time limit may not have flushed its output pipe.
REPORT = r"""
python
def report(line):
    print(line)
    with open({report!r}, "a") as f:
        f.write(line + "\n")
end
"""

# Python run inside gdb: find a vCPU stopped in kernel code, attaching again
# (every attach stops all vCPUs) until one is.
FIND_KERNEL = PRELUDE + REPORT + r"""
python
import gdb, time
KERNEL = 0xffff800000000000
def pc():
    return int(gdb.parse_and_eval("$pc")) & (2**64 - 1)
def kernel_thread(busy):
    for th in gdb.selected_inferior().threads():
        th.switch()
        if pc() < KERNEL:
            continue
        try:
            if busy and bytes(gdb.selected_inferior().read_memory(pc() - 1, 1)) == b"\xf4":
                continue  # just after hlt: stepping an idle vCPU waits for its next interrupt
        except gdb.MemoryError:
            continue
        return th
    return None
tries = 1
while kernel_thread({busy}) is None and tries < {attempts}:
    gdb.execute("detach", to_string=True)
    gdb.execute("target remote 127.0.0.1:{port}", to_string=True)
    tries += 1
found = kernel_thread({busy}) is not None
if not found:
    report("NOTE no vCPU in kernel code after %d stops" % tries)
"""

# A vCPU's kernel page tables map all of kernel text (with or without PTI).
DUMP = FIND_KERNEL.replace("{busy}", "False") + r"""
t = time.perf_counter()
try:
    gdb.execute("dump binary memory {dump} {lo:#x} {hi:#x}", to_string=True)
    report("RESULT mem_MBps=%.3f" % (({hi} - {lo}) / (time.perf_counter() - t) / 1e6))
except gdb.error as e:
    report("NOTE dump of kernel text failed: %s" % e)
end
detach
"""

STEP = FIND_KERNEL.replace("{busy}", "True") + r"""
if found:
    start, pcs = pc(), set()
    report("PROGRESS stepping vCPU %d from %#x" % (gdb.selected_thread().num, start))
    t = time.perf_counter()
    for i in range({steps}):
        gdb.execute("stepi", to_string=True)
        pcs.add(pc())
        if i % 10 == 9:
            report("PROGRESS %d steps done, at %#x" % (i + 1, pc()))
    report("RESULT stepi_per_s=%.2f" % ({steps} / (time.perf_counter() - t)))
    report("NOTE from %#x (found in %d stop(s)): %d distinct pcs, %d of them in the kernel"
          % (start, tries, len(pcs), sum(p >= KERNEL for p in pcs)))
end
detach
"""

# N continues to a breakpoint on the syscall; the first hit is not timed.
BREAK_HITS = PRELUDE + REPORT + r"""
python
import gdb, time
def pc():
    return int(gdb.parse_and_eval("$pc")) & (2**64 - 1)
gdb.execute("{kind} *{addr:#x}", to_string=True)
report("PROGRESS {kind} set, waiting for the first (untimed) hit")
t = time.perf_counter()
gdb.execute("continue", to_string=True)
report("NOTE first stop (untimed) at %#x after %.1f s" % (pc(), time.perf_counter() - t))
report("PROGRESS first stop, no timed hit yet")
at_bp, t = 0, time.perf_counter()
report("START %f" % time.time())  # wall clock: the bench works out a partial rate if gdb is killed
for i in range({hits}):
    gdb.execute("continue", to_string=True)
    at_bp += pc() == {addr}
    report("PROGRESS %d stops, %d at the breakpoint, %.1f s" % (i + 1, at_bp, time.perf_counter() - t))
rate = {hits} / (time.perf_counter() - t)
report("RESULT {key}=%.2f" % (rate if at_bp == {hits} else 0.0))
if at_bp != {hits}:
    report("NOTE only %d of {hits} stops were at the breakpoint (last at %#x)" % (at_bp, pc()))
gdb.execute("delete", to_string=True)
end
detach
"""


@dataclass
class Peer:
    """One debug target in L1: how to start it and what it measured."""

    name: str
    argv: list[str]
    guest_port: int
    waits_for_gdb: bool  # vmscope --gdb holds the vCPUs until a debugger continues
    results: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def peers(guests: str, cpus: int, mem: int) -> list[Peer]:
    kernel, initrd = f"{guests}/vmlinuz", f"{guests}/initramfs.cpio.gz"
    vmscope = PTY + ["python3", "-m", "vmscope", "run", "--accel", "kvm", "--kernel", kernel, "--initrd", initrd,
                     "--cpus", str(cpus), "--mem", str(mem), "--append", CMDLINE, "--gdb", f"0.0.0.0:{VMSCOPE_PORT}"]
    qemu = ["env", f"LD_LIBRARY_PATH={QEMU_DIR}/lib", f"{QEMU_DIR}/bin/qemu-system-x86_64", "-L", f"{QEMU_DIR}/share",
            "-enable-kvm", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-m", str(mem), "-smp", str(cpus), "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE,
            "-gdb", f"tcp::{QEMU_PORT}"]
    return [Peer("vmscope (kvm, lab)", vmscope, VMSCOPE_PORT, True),
            Peer("qemu -enable-kvm (lab)", qemu, QEMU_PORT, False)]


class Shell:
    """The guest's console shell: type a command, wait for its marker."""

    _ids = itertools.count(1)

    def __init__(self, vm) -> None:
        self.vm = vm

    def __call__(self, command: str, timeout: float = 120) -> str:
        n = next(self._ids)
        start = len(self.vm.stdout)
        # the echoed command line shows `$((n + 7000))`, only the shell's output shows the sum
        self.vm.write(f"{command}\necho bench-mark-$(({n} + 7000))\n")
        self.vm.wait_for_output(rf"bench-mark-{n + 7000}\b", timeout)
        out = self.vm.stdout[start:]
        out = out[: out.find(f"bench-mark-{n + 7000}")]
        return "\n".join(line for line in out.splitlines() if "bench-mark-$((" not in line)


def kernel_symbols(shell: Shell) -> dict[str, int]:
    """Relocated addresses from the guest's own /proc/kallsyms (root, so not zeroed)."""
    names = "|".join(SYMBOLS)
    out = shell(f"grep -E ' ({names})$' /proc/kallsyms")
    syms = {m[2]: int(m[1], 16) for m in re.finditer(rf"\b([0-9a-f]{{16}}) \w ({names})\b(?!\|)", out)}
    missing = set(SYMBOLS) - set(syms)
    if missing or not syms["_text"]:
        raise RuntimeError(f"kallsyms lacks {sorted(missing)} or hides addresses:\n{out[-1500:]}")
    return syms


def run_gdb(script: str, timeout: float) -> tuple[str, bool]:
    """Run one batch gdb; returns (stdout + stderr, timed_out). A gdb that
    times out is killed, which drops the connection: both stubs then remove
    their breakpoints and let the guest run."""
    with tempfile.NamedTemporaryFile("w", suffix=".gdb") as f:
        f.write(script)
        f.flush()
        try:
            r = subprocess.run([shutil.which("gdb"), "-q", "-nx", "-batch", "-x", f.name],
                               capture_output=True, text=True, timeout=timeout)
            return r.stdout + r.stderr, False
        except subprocess.TimeoutExpired as e:
            def text(b):
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            return text(e.stdout) + text(e.stderr), True


def collect(peer: Peer, phase: str, reported: str, out: str, timed_out: bool, limit: float,
            key: str | None = None, killed_at: float = 0.0) -> None:
    """Results and notes from what the gdb script reported; gdb's own error lines."""
    for key, value in re.findall(r"^RESULT (\w+)=([\d.]+)", reported, re.M):
        peer.results[key] = float(value)
    peer.notes += [f"{phase}: {n}" for n in re.findall(r"^NOTE (.*)$", reported, re.M)]
    if timed_out:
        progress = re.findall(r"^PROGRESS (.*)$", reported, re.M)
        peer.notes.append(f"{phase}: no answer in {limit:.0f} s (gdb killed)"
                          + (f"; had {progress[-1]}" if progress else ""))
        start = re.search(r"^START ([\d.]+)$", reported, re.M)
        hits = re.findall(r"^PROGRESS \d+ stops, (\d+) at the breakpoint", reported, re.M)
        if key and start and hits and int(hits[-1]):
            # hits until the time limit, over the time from the first timed continue to the kill
            rate = int(hits[-1]) / (killed_at - float(start[1]))
            peer.results[key] = rate
            peer.notes.append(f"{phase}: partial rate {rate:.3f} hits/s ({hits[-1]} hits before the time limit)")
    errors = [line for line in out.splitlines()
              if re.search(r"(?i)error|cannot|warning: remote|Remote connection|aborted", line)]
    peer.notes += [f"{phase}: gdb: {line.strip()}" for line in errors[:4]]


def measure(lab, peer: Peer, args, workdir: Path) -> None:
    port = lab.host_port(peer.guest_port)
    console.print(f"[bold]{peer.name}[/]: {' '.join(peer.argv[-30:])}")
    with lab.spawn(peer.argv) as vm:
        t0 = time.monotonic()
        if peer.waits_for_gdb:
            vm.wait_for_output("waiting for gdb", 120)
            out, timed_out = run_gdb(PRELUDE.format(port=port) + "detach\n", 120)  # let it boot undebugged
            if "detached" not in out:
                raise RuntimeError(f"gdb could not attach to let the guest boot:\n{out[-1500:]}")
        vm.wait_for_output(READY, args.boot_timeout)
        shell = Shell(vm)
        shell("echo booted", 120)
        console.print(f"  ready after {time.monotonic() - t0:.0f} s")
        syms = kernel_symbols(shell)
        pti = shell("cat /sys/devices/system/cpu/vulnerabilities/meltdown").strip().splitlines()
        peer.notes.append(f"_text={syms['_text']:#x} (KASLR), meltdown: {pti[-1].strip() if pti else '?'}")
        for _ in range(args.cpus):  # a syscall loop per vCPU
            shell("while :; do cat /proc/version >/dev/null; done &")
        time.sleep(3)
        peer.notes.append("workload on, /proc/loadavg: " + shell("cat /proc/loadavg").strip().splitlines()[-1])
        text_bytes = syms["_etext"] - syms["_text"]
        lo = syms["_text"]
        hi = lo + min(args.dump_mib * 1024 * 1024, text_bytes)
        limit = args.timeout if peer.waits_for_gdb else args.qemu_timeout
        openat = syms["__x64_sys_openat"]
        phases = [
            ("dump", DUMP, dict(attempts=args.attempts, dump=workdir / "text.bin", lo=lo, hi=hi)),
            ("stepi", STEP, dict(attempts=args.attempts, steps=args.steps)),
            ("hbreak", BREAK_HITS, dict(kind="hbreak", addr=openat, hits=args.hits, key="hbreak_hits_per_s")),
            ("break", BREAK_HITS, dict(kind="break", addr=openat, hits=args.hits, key="bp_hits_per_s")),
        ]
        for phase, template, params in phases:
            report = workdir / f"{peer.guest_port}-{phase}.txt"
            t = time.monotonic()
            out, timed_out = run_gdb(template.format(port=port, report=str(report), **params),
                                     args.timeout if phase == "dump" else limit)
            collect(peer, phase, report.read_text() if report.exists() else "", out, timed_out, limit,
                    key=params.get("key"), killed_at=time.time())
            console.print(f"  {phase}: {time.monotonic() - t:.0f} s "
                          + " ".join(f"{k}={v}" for k, v in peer.results.items()))
            if args.verbose:
                console.print(out[-3000:], markup=False, highlight=False)
        alive = True
        try:
            shell("echo still-alive", 60)
        except Exception:
            alive = False
        oopses = re.findall(r"(?m)^.*(?:BUG:|Oops|int3|general protection|Kernel panic|segfault).*$", vm.stdout)
        if oopses:
            peer.notes.append(f"the guest's console reported {len(oopses)} fault line(s), first: {oopses[0].strip()}")
        if not alive:
            peer.notes.append("the guest's shell no longer answers after the breakpoint phases; console tail: "
                              + " | ".join(vm.stdout[-600:].splitlines()[-6:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", choices=["linux"], default="linux", help=argparse.SUPPRESS)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--mem", type=int, default=512, help="guest MiB")
    ap.add_argument("--steps", type=int, default=500, help="stepi commands in kernel code")
    ap.add_argument("--hits", type=int, default=30, help="timed breakpoint hits per kind")
    ap.add_argument("--dump-mib", type=int, default=8, help="MiB of kernel text to dump (at most _etext - _text)")
    ap.add_argument("--attempts", type=int, default=20, help="stops tried to catch a vCPU in kernel code")
    ap.add_argument("--boot-timeout", type=float, default=400)
    ap.add_argument("--timeout", type=float, default=100, help="seconds for each of vmscope's gdb phases")
    ap.add_argument("--qemu-timeout", type=float, default=100,
                    help="seconds for each of QEMU's stepi and breakpoint phases (they may never stop in the lab)")
    ap.add_argument("--only", choices=["vmscope", "qemu"], help="measure one peer")
    ap.add_argument("--verbose", action="store_true", help="print each gdb transcript's tail")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if shutil.which("gdb") is None:
        sys.exit("gdb is not installed")

    from vmscope.lab import Lab

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, \
            Lab(cpus=2, mem_mib=2048, forward=[VMSCOPE_PORT, QEMU_PORT], port_range=HOST_PORTS,
                extra_files=qemu_files()) as lab:
        guests = lab.run("echo $VMSCOPE_LAB_GUESTS/linux", check=True).stdout.strip()
        lab.run("echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled", check=True)
        done = []
        for peer in peers(guests, args.cpus, args.mem):
            if args.only and not peer.name.startswith(args.only):
                continue
            try:
                measure(lab, peer, args, Path(tmp))
            except Exception as e:  # one failed peer should not hide the other
                peer.notes.append(f"failed: {type(e).__name__}: {str(e)[-1500:]}")
                console.print(f"[red]{peer.name} failed:[/] {e}")
            done.append(peer)
    results = {p.name: p.results for p in done}
    title = (f"gdb on a live Debian kernel in the nested lab ({args.cpus} vCPUs, {args.mem} MiB, KASLR; "
             f"{args.steps} stepi, {args.dump_mib} MiB of kernel text, {args.hits} hits on __x64_sys_openat)")
    ratios = print_table(title, results, METRICS)
    for p in done:
        for note in p.notes:
            print(f"{p.name}: {note}")
    print(f"total {time.monotonic() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"guest": "linux", "results": results, "ratios": ratios,
                                         "notes": {p.name: p.notes for p in done}}, indent=2))
    return 0 if any(p.results for p in done if p.name.startswith("vmscope")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
