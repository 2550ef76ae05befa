#!/usr/bin/env python3
"""Side-by-side: the same GDB workload against vmscope's stubs, QEMU's, and the floor.

For each guest (default: the demo guest and ``walk``, a standard PVH guest
with another loop, stack and data layout; or any PVH ELF path), every peer
boots the same ELF and waits for GDB: vmscope on KVM, vmscope's emulated
CPU, QEMU ``-enable-kvm`` (skipped with a printed reason where /dev/kvm is
unusable) and QEMU TCG. Stock ``gdb`` then, once the guest sits in its loop
(``tick``, or ``visit`` for walk), in one connection per phase (each with
its own time limit: QEMU's KVM hangs on an INT3 on this software KVM):

- single-steps N times (one ``stepi`` per gdb command): **stepi/s**
- ``dump binary memory`` of 16 MiB of guest RAM (3 MiB on walk, which
  maps 4), ``--dumps`` times (3): **memory MB/s**, the median (one dump
  varied by 30% from the next on this machine). That RAM is almost all
  zero pages, which vmscope's replies run-length encode and QEMU's do not;
  so the same script then ``restore``\ s random bytes (a fixed seed) into
  the largest span no segment of the guest uses (8 MiB on demo, 2 MiB on
  walk) and dumps that: **memory MB/s, random bytes**, what a dump of a
  kernel's data is closer to (:func:`data_region`)
- continues N times to ``hbreak``, to a ``watch`` on the loop's counter,
  and to ``break``: **hits/s** of each.

A second run of each peer goes through a recording proxy and counts the
packets gdb sends per operation. The replies recorded from vmscope KVM are
then replayed as fast as possible by ``bench/rsp_replay.py`` for the very
same script: gdb's own cost plus the minimum round trip, **the floor**.
The table shows each rate, then each vmscope peer over QEMU TCG, over the
best QEMU and over the floor. Numbers are from one run on a noisy shared
machine: compare within a run, not across (the 1-minute load average is
printed first).

    python bench/gdb_ops.py                       # x86_64, demo and walk guests
    python bench/gdb_ops.py --guest idt --peers vmscope --peers tcg
    python bench/gdb_ops.py --arch aarch64        # vmscope emu vs qemu-system-aarch64 TCG
    python bench/gdb_ops.py --json out.json
    python bench/gdb_ops.py --guest linux         # Debian kernel in the nested lab: vmscope vs QEMU -enable-kvm
                                                  # (bench/gdb_linux.py; see its docstring)
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

from vmscope.childproc import die_with_parent  # noqa: E402
from vmscope.guests import guest_elf  # noqa: E402

console = Console(stderr=True)

# Each phase is its own gdb connection with its own time limit: QEMU with
# this machine's software KVM reports an INT3 as an emulation failure and
# hangs, and its data watchpoints never fire. A phase first reaches the loop
# with a hardware breakpoint (it works on every peer). `maint packet` sends
# a marker the stub answers with an empty reply: the recorder splits the
# packet log at them to count packets per operation.
_PRELUDE = r"""
set pagination off
set confirm off
target remote 127.0.0.1:{port}
hbreak {fn}
continue
delete
python
import gdb, time
def mark(name):
    gdb.execute("maint packet qvmscope.bench:" + name, to_string=True)
def timed(n, cmd):
    t = time.perf_counter()
    for _ in range(n):
        gdb.execute(cmd, to_string=True)
    return n / (time.perf_counter() - t)
def dump_rate(n, path, lo, hi):
    rates = []
    for _ in range(n):
        t = time.perf_counter()
        gdb.execute("dump binary memory %s %#x %#x" % (path, lo, hi), to_string=True)
        rates.append((hi - lo) / (time.perf_counter() - t) / 1e6)
    return sorted(rates)[len(rates) // 2]
"""
PHASES = {
    # name: (script body, result keys)
    "main": (r"""
mark("stepi")
steps = timed({steps}, "stepi")
mark("dump")
mbps = dump_rate({dumps}, "{dump}", {mem_lo:#x}, {mem_hi:#x})
mark("restore")
gdb.execute("restore {noise} binary {data_lo:#x}", to_string=True)
mark("dump-data")
data_mbps = dump_rate({dumps}, "{dump}", {data_lo:#x}, {data_hi:#x})
gdb.execute("hbreak {fn}", to_string=True)
mark("hbreak")
hits = timed({hits}, "continue")
mark("end")
gdb.execute("delete", to_string=True)
print("RESULT stepi_per_s=%.1f mem_MBps=%.2f mem_data_MBps=%.2f hbreak_hits_per_s=%.1f" % (steps, mbps, data_mbps, hits))
""", ("stepi_per_s", "mem_MBps", "mem_data_MBps", "hbreak_hits_per_s")),
    "watch": (r"""
gdb.execute("watch {var}", to_string=True)
mark("watch")
hits = timed({watch_hits}, "continue")
mark("end")
gdb.execute("delete", to_string=True)
print("RESULT watch_hits_per_s=%.1f" % hits)
""", ("watch_hits_per_s",)),
    "break": (r"""
gdb.execute("break {fn}", to_string=True)
mark("break")
hits = timed({hits}, "continue")
mark("end")
gdb.execute("delete", to_string=True)
print("RESULT bp_hits_per_s=%.1f" % hits)
""", ("bp_hits_per_s",)),
}
#: which marker phase measures which result, and how many operations it ran
OPS = {"stepi": ("stepi_per_s", "steps"), "dump": ("mem_MBps", "dumps"), "dump-data": ("mem_data_MBps", "dumps"),
       "hbreak": ("hbreak_hits_per_s", "hits"),
       "watch": ("watch_hits_per_s", "watch_hits"), "break": ("bp_hits_per_s", "hits")}


#: per guest: the function its loop calls (breakpoints), the variable it
#: increments there (watchpoints), and how much RAM from 1 MiB it maps (dump)
GUEST_LOOPS = {"tick": ("tick", "counter", 16), "visit": ("visit", "visits", 3)}


def guest_loop(elf: Path) -> tuple[str, str, int]:
    """(function, variable, mapped MiB from 1 MiB) for a guest ELF: demo
    and idt loop on tick/counter; walk (a standard PVH guest, 4 MiB
    identity-mapped) on visit/visits."""
    from elftools.elf.elffile import ELFFile

    with open(elf, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        names = {sym.name for sym in symtab.iter_symbols()} if symtab else set()
    for fn, loop in GUEST_LOOPS.items():
        if fn in names:
            return loop
    raise SystemExit(f"{elf}: no tick or visit function to break on")


def data_region(elf: Path, mem_lo: int, mem_hi: int) -> tuple[int, int]:
    """Where the random-bytes dump writes and reads: the largest page-aligned
    span of [mem_lo, mem_hi) that no loadable segment of the guest uses
    (its code, data, page tables and stacks stay as they are), at most 8 MiB.

    Why a second dump: the guests' spare RAM is zeroed, which vmscope's
    replies run-length encode (a zero page crosses the wire as 252 bytes)
    and QEMU's do not; a dump of real memory (a kernel's) is mostly data."""
    from elftools.elf.elffile import ELFFile

    with open(elf, "rb") as f:
        used = sorted((seg["p_vaddr"], seg["p_vaddr"] + seg["p_memsz"]) for seg in ELFFile(f).iter_segments()
                      if seg["p_type"] == "PT_LOAD")
    page = 0x1000
    spans, start = [], mem_lo
    for lo, hi in used + [(mem_hi, mem_hi)]:
        if lo > start:
            spans.append((start, min(lo, mem_hi) & ~(page - 1)))
        start = max(start, (hi + page - 1) & ~(page - 1))
    lo, hi = max(spans, key=lambda span: span[1] - span[0])
    return lo, min(hi, lo + (8 << 20))


def phase_script(phase: str, port: int, args, tmp: Path, mem_lo: int, mem_hi: int, scale: float = 1.0) -> str:
    body, _ = PHASES[phase]
    n = {k: max(1, int(getattr(args, k) * scale)) for k in ("steps", "hits", "watch_hits", "dumps")}
    text = _PRELUDE + body + "end\n" + ("kill\n" if phase == "break" else "detach\n")
    data_lo, data_hi = args.data_region
    noise = tmp / "noise.bin"
    if not noise.exists():  # the same bytes for every peer: a fixed seed
        noise.write_bytes(random.Random(0).randbytes(data_hi - data_lo))
    return text.format(port=port, dump=tmp / "mem.bin", mem_lo=mem_lo, mem_hi=mem_hi, fn=args.loop[0],
                       var=args.loop[1], noise=noise, data_lo=data_lo, data_hi=data_hi, **n)


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
        ours = [sys.executable, "-m", "vmscope", "run", "--kernel", str(elf), "--mem", str(mem_mib),
                "--gdb", "127.0.0.1:{port}", "--accel"]
        out = {"vmscope (kvm)": ours + ["kvm"], "vmscope (emu)": ours + ["emu"]}
        if os.access("/dev/kvm", os.R_OK | os.W_OK):
            out["qemu -enable-kvm"] = qemu + ["-enable-kvm"]
        else:
            console.print("[yellow]vmscope (kvm) and qemu -enable-kvm skipped: /dev/kvm is not usable here[/]")
            del out["vmscope (kvm)"]
        out["qemu -accel tcg"] = qemu + ["-accel", "tcg"]
        return out
    qemu = ["qemu-system-aarch64", "-M", "virt", "-cpu", "max", "-kernel", str(elf), "-m", str(mem_mib),
            "-nodefaults", "-display", "none", "-serial", "null", "-S", "-gdb", "tcp:127.0.0.1:{port}"]
    return {
        "vmscope (emu)": [sys.executable, "-m", "vmscope", "run", "--accel", "emu", "--arch", "aarch64",
                          "--kernel", str(elf), "--mem", str(mem_mib), "--gdb", "127.0.0.1:{port}"],
        "qemu -accel tcg": qemu + ["-accel", "tcg"],
    }


def _gdb(gdb: str, script: Path, elf: Path, timeout: float) -> str:
    try:
        res = subprocess.run([gdb, "-q", "-nx", "-batch", "-x", str(script), str(elf)],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ""
    return res.stdout + res.stderr


def _results(out: str, keys: tuple[str, ...]) -> dict[str, float] | None:
    m = re.search(r"^RESULT (.*)$", out, re.M)
    if not m:
        return None
    found = dict(item.split("=") for item in m[1].split())
    return {k: float(found[k]) for k in keys}


def run_peer(name: str, cmd: list[str] | None, gdb: str, elf: Path, args, mem_lo: int, mem_hi: int,
             record: float = 0.0, phases=tuple(PHASES), replay_logs: dict | None = None) -> tuple[dict, dict]:
    """Run every phase against one peer process (or, with ``replay_logs``,
    against the replay stub, one per phase). ``record`` > 0: go through a
    :class:`Recorder` with the counts scaled by it, for packet logs.
    Returns (results, packet logs by phase)."""
    from bench.rsp_replay import Recorder

    port = free_port()
    proc = None
    if cmd is not None:
        cmd = [c.format(port=port) for c in cmd]
        console.print(f"[bold]{name}[/]{' (recording packets)' if record else ''}: {' '.join(cmd)}")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                cwd=ROOT, preexec_fn=die_with_parent)
    out: dict[str, float] = {}
    logs: dict[str, list] = {}
    try:
        if proc is not None:
            wait_port(port, proc)
        with tempfile.TemporaryDirectory() as tmp:
            for i, phase in enumerate(phases):
                keys = PHASES[phase][1]
                gdb_port, recorder, replay = port, None, None
                if replay_logs is not None:
                    replay, gdb_port = _start_replay(replay_logs[phase], Path(tmp) / f"{phase}.log")
                elif record:
                    recorder = Recorder(port)
                    gdb_port = recorder.port
                script = Path(tmp) / f"{phase}.gdb"
                text = phase_script(phase, gdb_port, args, Path(tmp), mem_lo, mem_hi, scale=record or 1.0)
                if i == len(phases) - 1:
                    text = text.replace("\ndetach\n", "\nkill\n")
                script.write_text(text)
                res = _results(_gdb(gdb, script, elf, args.timeout if phase == "main" else args.phase_timeout), keys)
                if replay is not None:
                    replay.wait(10)
                    err = replay.stderr.read()
                    if "mismatches=0" not in err:
                        console.print(f"[yellow]floor {phase}: the replay diverged from the recording: {err.strip()}[/]")
                if res is None:
                    console.print(f"[yellow]{name}: phase {phase} did not finish in time (its figures count as 0)[/]")
                    out.update({k: 0.0 for k in keys})
                else:
                    out.update(res)
                    if recorder is not None:
                        logs[phase] = recorder.log()
                if proc is not None and proc.poll() is not None:
                    console.print(f"[yellow]{name} exited after phase {phase}[/]")
                    break
        return out, logs
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def _start_replay(log: list, path: Path) -> tuple[subprocess.Popen, int]:
    """The replay stub in its own process (no GIL shared with this one)."""
    import pickle

    path.write_bytes(pickle.dumps(log))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "rsp_replay.py"), "serve", str(port), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    proc.stdout.readline()  # "ready"
    return proc, port


def packets_per_op(logs: dict[str, list], args, scale: float) -> dict[str, float]:
    """Requests gdb sent between the markers of each operation, per
    operation (per dump for the memory dump)."""
    out = {}
    for log in logs.values():
        current, count = None, 0
        for req, _ in log:
            if req.startswith(b"qvmscope.bench:"):
                if current in OPS:
                    key, n_attr = OPS[current]
                    n = max(1, int(getattr(args, n_attr) * scale)) if n_attr else 1
                    out[key] = count / n
                current, count = req.split(b":", 1)[1].decode(), 0
            else:
                count += 1
    return out


# (label, result key, target ratio vmscope / best QEMU)
METRICS = [("stepi/s", "stepi_per_s", 1.5), ("memory MB/s", "mem_MBps", 10.0),
           ("memory MB/s, random bytes", "mem_data_MBps", None),
           ("breakpoint hits/s (break)", "bp_hits_per_s", 1.5),
           ("breakpoint hits/s (hbreak)", "hbreak_hits_per_s", 1.5),
           ("watchpoint hits/s", "watch_hits_per_s", 1.0)]
FLOOR = "floor (replay)"


def _target(target: float | None, of: str = "") -> str:
    return "reported" if target is None else f"{target:.1f}x{of}"


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
            row += [f"{ratios[key]:.2f}x" if best else "QEMU failed", _target(target)]
        else:
            row += ["-", _target(target)]
        table.add_row(*row)
    Console().print(table)
    return ratios


def print_guest_table(title: str, results: dict[str, dict], packets: dict[str, dict]) -> dict[str, dict]:
    """Rates per peer and the floor, then each vmscope peer over QEMU TCG,
    over the best QEMU and over the floor; then gdb's packets per operation
    per peer. Returns the ratios by vmscope peer, then "<key>/<other>"."""
    ours = [k for k in results if k.startswith("vmscope")]
    qemus = [k for k in results if k.startswith("qemu")]
    others = [("TCG", ["qemu -accel tcg"]), ("best QEMU", qemus), ("floor", [FLOOR])]
    table = Table(title=title)
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for name in ours:
        for label, _ in others:
            table.add_column(f"{name.split()[1]}/{label}", justify="right")
    table.add_column("target", justify="right")
    ratios: dict[str, dict] = {name: {} for name in ours}
    for label, key, target in METRICS:
        row = [label] + [_figure(results[n].get(key, 0.0)) for n in results]
        for name in ours:
            for other, peers_ in others:
                best = max((results[p].get(key, 0.0) for p in peers_ if p in results), default=0.0)
                if best:
                    ratios[name][f"{key}/{other}"] = results[name].get(key, 0.0) / best
                    row.append(f"{ratios[name][f'{key}/{other}']:.2f}x")
                else:
                    row.append("-")
        table.add_row(*row, _target(target, " QEMU"))
    Console(width=250).print(table)
    counts = Table(title="packets gdb sent per operation (the dump: per whole dump)")
    counts.add_column("operation")
    for name in packets:
        counts.add_column(name, justify="right")
    for label, key, _ in METRICS:
        counts.add_row(label, *[f"{packets[n][key]:.1f}" if key in packets[n] else "-" for n in packets])
    Console(width=250).print(counts)
    return ratios


def guest_path(guest: str, arch: str) -> Path:
    """A packaged guest by name, or a PVH ELF by path (it needs ``tick``
    and ``counter`` symbols)."""
    path = Path(guest)
    return path if path.suffix == ".elf" or path.exists() else guest_elf(guest, arch)


def bench_guest(guest: str, args, gdb: str) -> dict:
    elf = guest_path(guest, args.arch)
    args.loop = guest_loop(elf)
    dump_mib = min(args.dump_mib, args.loop[2])
    base = 0x100000 if args.arch == "x86_64" else 0x40000000
    mem_lo, mem_hi = base, base + dump_mib * 1024 * 1024
    args.data_region = data_region(elf, mem_lo, mem_hi)
    mem_mib = max(64, args.dump_mib + 16)
    results: dict[str, dict] = {}
    packets: dict[str, dict] = {}
    floor_logs = None
    for name, cmd in peers(args.arch, elf, mem_mib).items():
        if args.peers and not any(p in name for p in args.peers):
            continue
        try:
            results[name], _ = run_peer(name, cmd, gdb, elf, args, mem_lo, mem_hi)
            # A second run through the recorder: packet counts, and for the
            # first vmscope peer the log the floor replays (same counts).
            done = tuple(p for p in PHASES if any(results[name].get(k) for k in PHASES[p][1]))
            full = floor_logs is None and name.startswith("vmscope")
            scale = 1.0 if full else args.count_scale
            _, logs = run_peer(name, cmd, gdb, elf, args, mem_lo, mem_hi, record=scale, phases=done)
            packets[name] = packets_per_op(logs, args, scale)
            if full:
                floor_logs, floor_from = logs, name
        except Exception as e:  # one failed peer should not hide the others
            console.print(f"[red]{name} failed:[/] {e}")
    if floor_logs:
        console.print(f"[bold]{FLOOR}[/]: the replies recorded from {floor_from}")
        results[FLOOR], _ = run_peer(FLOOR, None, gdb, elf, args, mem_lo, mem_hi, phases=tuple(floor_logs),
                                     replay_logs=floor_logs)
        packets[FLOOR] = packets[floor_from]
    title = (f"gdb operations, {args.arch} guest {elf.name} ({args.steps} stepi, {dump_mib} MiB dump, "
             f"{args.hits} breakpoint hits, {args.watch_hits} watchpoint hits)")
    ratios = print_guest_table(title, results, packets)
    return {"elf": str(elf), "results": results, "packets_per_op": packets, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", action="append",
                    help="a packaged guest (demo, idt, walk), a PVH ELF path, or linux (Debian's kernel in the nested "
                         "lab); repeat for several; default: demo and walk (x86_64), demo (aarch64)")
    ap.add_argument("--arch", choices=["x86_64", "aarch64"], default="x86_64")
    ap.add_argument("--peers", action="append", help="only peers whose name contains this (repeatable)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--hits", type=int, default=400)
    ap.add_argument("--watch-hits", type=int, default=200)
    ap.add_argument("--dump-mib", type=int, default=16)
    ap.add_argument("--dumps", type=int, default=3, help="dumps per peer; the median rate is reported")
    ap.add_argument("--count-scale", type=float, default=0.1,
                    help="operations of the packet-counting run, as a fraction of the timed run's")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for a peer's stepi/dump/hbreak phase")
    ap.add_argument("--phase-timeout", type=float, default=45, help="seconds for the watch and break phases")
    ap.add_argument("--json", type=Path)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--guest", action="append")
    if "linux" in (pre.parse_known_args(argv)[0].guest or []):  # its own options and defaults (a lab, slower peers)
        from bench import gdb_linux

        return gdb_linux.main(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    guests = args.guest or (["demo", "walk"] if args.arch == "x86_64" else ["demo"])
    gdb = shutil.which("gdb" if args.arch == "x86_64" else "gdb-multiarch")
    console.print(f"load before the run: {os.getloadavg()[0]:.2f} (1-minute average, {os.cpu_count()} CPUs)")
    report = {"arch": args.arch, "guests": {g: bench_guest(g, args, gdb) for g in guests}}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(any(k.startswith("vmscope") for k in r["results"]) for r in report["guests"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
