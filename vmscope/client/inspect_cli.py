"""``vmscope inspect``: look inside a running guest through any GDB stub.

    vmscope inspect --gdb HOST:PORT [--qmp HOST:PORT] ps | lsmod | dmesg |
        regs | uptime | info | read ADDR LEN | translate ADDR | symbols PATTERN

Tables for people (rich), ``--json`` for scripts. No vmlinux is needed:
symbols come from kallsyms and layouts from BTF in guest memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

from vmscope.client.client import StubError
from vmscope.client.helpers.qemu import QmpError
from vmscope.client.transport import ConnectionLost, StubTimeout
from vmscope.vmi.address_space import AddressSpace
from vmscope.vmi.errors import VmiError
from vmscope.vmi.linux.btf import BtfError
from vmscope.vmi.linux.reports import dmesg_rows, lsmod_rows, ps_rows
from vmscope.vmi.paging.x86_64 import X86_64Paging


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (use 0x... for hex)") from None


def add_connection_options(p: argparse.ArgumentParser, *, suppress: bool = False, core: bool = False) -> None:
    """The options every command shares (``vmscope trace`` takes them too;
    ``core`` adds ``--core``, for commands that can read a core file). With
    ``suppress`` (a subcommand's copy) an option left out keeps what was
    given before the subcommand, so ``vmscope inspect ps --json`` and
    ``vmscope inspect --json ps`` agree."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--gdb", metavar="HOST:PORT", default=default(None),
                   help="GDB stub address (host:port, unix:/path or /path)")
    p.add_argument("--qmp", metavar="HOST:PORT", default=default(None),
                   help="QEMU QMP address: system registers and shared RAM")
    if core:
        p.add_argument("--core", metavar="FILE", default=default(None),
                       help="inspect an ELF core (vmscope dump, QEMU dump-guest-memory) instead of a live guest")
    p.add_argument("--memory", choices=("auto", "shared", "vmscope", "rsp"), default=default("auto"),
                   help="how to read guest-physical memory (default: fastest available)")
    p.add_argument("--system-map", metavar="PATH", default=default(None),
                   help="use this System.map instead of kallsyms")
    p.add_argument("--json", action="store_true", default=default(False), help="print JSON instead of tables")
    p.add_argument("--no-cache", action="store_true", default=default(False),
                   help="decode kallsyms and BTF afresh instead of using the per-kernel cache")
    p.add_argument("--timeout", type=float, default=default(10.0),
                   help="seconds to wait for the stub (default 10)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmscope inspect", description=__doc__.split("\n\n")[0])
    add_connection_options(p, core=True)
    shared = argparse.ArgumentParser(add_help=False)
    add_connection_options(shared, suppress=True, core=True)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    ps = sub.add_parser("ps", parents=[shared], help="processes: pid, ppid, state, user/kernel, name")
    ps.add_argument("-f", "--full", action="store_true", help="also each process's command line (from its memory)")
    ps.add_argument("-T", "--threads", action="store_true", help="list every thread (TID in the PID column)")
    sub.add_parser("lsmod", parents=[shared], help="loaded kernel modules, as /proc/modules")
    d = sub.add_parser("dmesg", parents=[shared], help="the kernel log from the printk ring buffer")
    d.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines")
    sub.add_parser("regs", parents=[shared], help="registers, with control registers and EFER")
    sub.add_parser("uptime", parents=[shared], help="seconds since the guest booted")
    sub.add_parser("info", parents=[shared], help="kernel version, KASLR slide, memory path")
    r = sub.add_parser("read", parents=[shared], help="hex dump of guest memory")
    r.add_argument("addr", type=_int)
    r.add_argument("length", type=_int)
    r.add_argument("--physical", action="store_true", help="ADDR is guest-physical")
    r.add_argument("--pid", type=int, help="ADDR is in this process's user address space")
    r.add_argument("-o", "--output", metavar="FILE", help="write the raw bytes to FILE")
    t = sub.add_parser("translate", parents=[shared], help="virtual -> physical through the guest's page tables")
    t.add_argument("addr", type=_int)
    t.add_argument("--cr3", type=_int, help="page-table root to use (default: the kernel's)")
    t.add_argument("--pid", type=int, help="translate through this process's page tables")
    s = sub.add_parser("symbols", parents=[shared], help="kernel symbols matching a regex or glob")
    s.add_argument("pattern", nargs="?", default=".", help="regex or glob (default: all)")
    s.add_argument("--elf", metavar="FILE",
                   help="also write the matching symbols as an ELF symbol file for gdb's add-symbol-file")
    g = sub.add_parser("drgn", parents=[shared], help="a Python prompt with a drgn Program over the guest (pip install drgn)")
    g.add_argument("-c", "--command", help="run this Python code instead of a prompt")
    g.add_argument("--vmlinux", help="vmlinux with DWARF, for types")
    return p


@contextmanager
def _progress(console: Console):
    """A progress bar on stderr for long scans (only on a terminal)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console,
                    transient=True, disable=not console.is_terminal)
    tasks: dict[str, int] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = prog.add_task(what, total=total)
        prog.update(tasks[what], completed=done, total=total)

    with prog:
        yield update


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if not args.gdb and not args.qmp and not args.core:
        err.print("vmscope inspect: error: give --gdb HOST:PORT, --qmp HOST:PORT, both, or --core FILE")
        return 2
    if args.core and (args.gdb or args.qmp):
        err.print("vmscope inspect: error: --core inspects a file: give it without --gdb/--qmp")
        return 2
    from vmscope.client.session import Inspector

    try:
        with _progress(err) as progress:
            if args.core:
                from vmscope.dump.offline import CoreInspector

                session = CoreInspector(args.core, progress=progress, system_map=args.system_map,
                                        disk_cache=not args.no_cache)
            else:
                session = Inspector(args.gdb, args.qmp, memory=args.memory, timeout=args.timeout,
                                    progress=progress, system_map=args.system_map, disk_cache=not args.no_cache)
            with session as ins:
                return COMMANDS[args.cmd](ins, args, out)
    except (VmiError, StubError, QmpError, BtfError, ConnectionLost, StubTimeout, OSError, ValueError,
            KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        err.print(f"vmscope inspect: error: {msg}", markup=False)
        return 1


def _emit(out: Console, args, rows: list[dict], table: Table) -> int:
    if args.json:
        out.print_json(json.dumps(rows)) if out.is_terminal else print(json.dumps(rows, indent=1))
    else:
        out.print(table)
    return 0


def cmd_ps(ins, args, out) -> int:
    rows = ps_rows(ins.kernel(), threads=args.threads, full=args.full)
    columns = ["PID", "PPID", "S", "KIND", "CPU", "COMMAND"] + (["ARGS"] if args.full else [])
    what = "threads" if args.threads else "processes"
    table = Table(*columns, title=f"{len(rows)} {what}", title_justify="left")
    for r in rows:
        cells = [str(r["pid"]), str(r["ppid"]), r["state"], r["kind"], "" if r["cpu"] is None else str(r["cpu"]),
                 r["comm"]]
        if args.full:
            cells.append(" ".join(r["cmdline"]) if r["cmdline"] else f"[{r['comm']}]")
        table.add_row(*cells)
    return _emit(out, args, rows, table)


def cmd_lsmod(ins, args, out) -> int:
    rows = lsmod_rows(ins.kernel())
    table = Table("MODULE", "SIZE", "USED", "BY", "STATE", "ADDRESS")
    for r in rows:
        table.add_row(r["name"], str(r["size"]), str(r["refcount"]), ",".join(r["used_by"]) or "-", r["state"],
                      r["base"])
    return _emit(out, args, rows, table)


def cmd_dmesg(ins, args, out) -> int:
    if args.json:
        print(json.dumps(dmesg_rows(ins.kernel(), args.lines), indent=1))
        return 0
    recs = ins.kernel().dmesg()
    for r in recs[-args.lines :] if args.lines > 0 else recs:
        out.print(r.format(), markup=False)
    return 0


def cmd_regs(ins, args, out) -> int:
    regs = ins.registers()
    if args.json:
        print(json.dumps({k: hex(v) for k, v in regs.items()}, indent=1))
        return 0
    items = [(k, v) for k, v in regs.items()
             if not k.startswith(("xmm", "st", "ymm", "zmm", "f")) or k == "fs_base"]
    for i in range(0, len(items), 3):
        print("   ".join(f"{k:<10} 0x{v:016x}" for k, v in items[i : i + 3]))
    return 0


def cmd_uptime(ins, args, out) -> int:
    up = ins.kernel().uptime()
    print(json.dumps({"uptime": up}) if args.json else f"{up:.2f}")
    return 0


def cmd_info(ins, args, out) -> int:
    k = ins.kernel()
    info = {"banner": k.banner(), "text": hex(k.text), "kaslr_slide": hex(k.slide), "phys_base": hex(k.phys_base),
            "kernel_pgd": hex(k.root), "symbols": len(k.symbols), "memory_path": ins.memory_path}
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        table = Table("FIELD", "VALUE")
        for key, value in info.items():
            table.add_row(key, str(value))
        out.print(table)
    return 0


def _root_space(ins, cr3: int | None, pid: int | None = None) -> AddressSpace:
    """A process's page tables (``pid``), the kernel's when the guest is
    Linux, else the CPU's cr3."""
    if pid is not None:
        kernel = ins.kernel()
        return kernel.process_address_space(kernel.task(pid))
    regs = ins.registers()
    if cr3 is None:
        if "cr0" in regs and not regs["cr0"] & (1 << 31):
            raise VmiError(f"paging is off (cr0=0x{regs['cr0']:x}, PG clear): addresses are physical; "
                           "use read --physical, or --cr3 to walk tables anyway")
        try:
            return ins.kernel().aspace
        except VmiError:
            cr3 = regs.get("cr3")
            if cr3 is None:
                raise
    return AddressSpace(X86_64Paging(ins.phys, cr3, cr4=regs.get("cr4", 0), cache=ins.cache))


def cmd_read(ins, args, out) -> int:
    if args.length < 0:
        raise ValueError("LEN must not be negative")
    if args.physical:
        data = ins.phys.read(args.addr, args.length)
    else:
        data = _root_space(ins, None, args.pid).read(args.addr, args.length)
    if args.output:
        with open(args.output, "wb") as f:
            f.write(data)
        print(f"wrote {len(data)} bytes to {args.output}")
        return 0
    if args.json:
        print(json.dumps({"addr": hex(args.addr), "data": data.hex()}))
        return 0
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        print(f"{args.addr + off:016x}  {chunk[:8].hex(' '):<23}  {chunk[8:].hex(' '):<23}  |{text}|")
    return 0


def cmd_translate(ins, args, out) -> int:
    aspace = _root_space(ins, args.cr3, args.pid)
    tr = aspace.translate(args.addr)
    p = tr.page
    row = {"virtual": hex(tr.vaddr), "physical": hex(tr.paddr), "page_size": p.size, "level": p.level,
           "writable": p.writable, "user": p.user, "nx": p.nx}
    if args.json:
        print(json.dumps(row))
    else:
        flags = ("W" if p.writable else "-") + ("U" if p.user else "S") + ("NX" if p.nx else "X")
        print(f"0x{tr.vaddr:x} -> 0x{tr.paddr:x}  ({p.size >> 10} KiB page at {p.level}, {flags})")
    return 0


def cmd_symbols(ins, args, out) -> int:
    syms = list(ins.kernel().symbols.search(args.pattern))
    rows = [{"name": s.name, "address": hex(s.address), "type": s.type} for s in syms]
    if args.elf:
        from vmscope.vmi.linux.symfile import symbol_elf

        kernel = ins.kernel()
        with open(args.elf, "wb") as f:
            f.write(symbol_elf(syms, kernel.arch))
        print(f"wrote {len(syms)} symbols to {args.elf}; in gdb: add-symbol-file {args.elf}", file=sys.stderr)
        if not args.json:
            return 0
    table = Table("ADDRESS", "T", "NAME", title=f"{len(rows)} symbols", title_justify="left")
    for s in syms[:5000]:
        table.add_row(f"{s.address:016x}", s.type, s.name)
    return _emit(out, args, rows, table)


def cmd_drgn(ins, args, out) -> int:
    prog = ins.drgn(args.vmlinux)
    scope = {"prog": prog, "kernel": ins.kernel(), "inspector": ins}
    if args.command:
        exec(compile(args.command, "<inspect drgn -c>", "exec"), scope)
        return 0
    import code

    code.interact(banner="drgn Program over the guest: prog, kernel (vmscope LinuxKernel), inspector", local=scope)
    return 0


COMMANDS = {"ps": cmd_ps, "lsmod": cmd_lsmod, "dmesg": cmd_dmesg, "regs": cmd_regs, "uptime": cmd_uptime,
            "info": cmd_info, "read": cmd_read, "translate": cmd_translate, "symbols": cmd_symbols, "drgn": cmd_drgn}

if __name__ == "__main__":
    sys.exit(main())
