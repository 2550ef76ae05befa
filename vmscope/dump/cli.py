"""``vmscope dump``: write a live guest's memory as an ELF core.

    vmscope dump --gdb HOST:PORT [--qmp HOST:PORT] OUT

The core has QEMU's ``dump-guest-memory`` format (crash and drgn open it as
a kernel dump); ``vmscope inspect --core OUT`` reads it like the live guest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from rich.console import Console


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmscope dump", description=__doc__.split("\n\n")[0])
    p.add_argument("--gdb", metavar="HOST:PORT", required=True, help="GDB stub address (host:port or unix:/path)")
    p.add_argument("--qmp", metavar="HOST:PORT", help="QEMU QMP address: shared RAM, RAM map, system registers")
    p.add_argument("--memory", choices=("auto", "shared", "vmscope", "rsp"), default="auto",
                   help="how to read guest-physical memory (default: fastest available)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the stub (default 10)")
    p.add_argument("out", help="the core file to write")
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from vmscope.client.session import Inspector
    from vmscope.dump.elfcore import CoreError
    from vmscope.dump.take import dump_guest
    from vmscope.vmi.errors import VmiError

    args = build_parser().parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    t0 = time.monotonic()
    try:
        with Inspector(args.gdb, args.qmp, memory=args.memory, timeout=args.timeout) as ins:
            with Progress(TextColumn("dumping guest RAM"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          console=err, transient=True, disable=not err.is_terminal) as bar:
                task = bar.add_task("dump", total=None)
                plan = dump_guest(ins, args.out, lambda done, total: bar.update(task, completed=done, total=total))
            path = ins.memory_path
    except (VmiError, CoreError, OSError, ValueError, ConnectionError, TimeoutError) as e:
        err.print(f"vmscope dump: error: {e}", markup=False)
        if os.path.exists(args.out) and os.path.getsize(args.out) == 0:
            os.unlink(args.out)
        return 1
    mib = plan.ram_bytes / (1 << 20)
    took = time.monotonic() - t0
    print(f"wrote {args.out}: {mib:.0f} MiB of RAM in {len(plan.regions)} regions, {len(plan.cpus)} vCPUs, "
          f"{'VMCOREINFO' if plan.vmcoreinfo else 'no VMCOREINFO'}; {took:.1f} s ({mib / max(took, 1e-9):.0f} MiB/s "
          f"via {path}); the guest runs on", file=sys.stderr)
    return 0
