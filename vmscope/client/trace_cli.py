"""``vmscope trace``: a probe on kernel functions from the command line.

    vmscope trace SYMBOL [SYMBOL...] --gdb HOST:PORT [--qmp HOST:PORT]
        [--args NAME[:FMT],...] [--count N] [--seconds S] [--json]

One line per hit (time, CPU, pid, command, decoded arguments; strings for
``char *`` arguments, read in the calling process's memory for syscalls),
then a summary. Ctrl-C ends it with the summary; whatever way it ends the
breakpoints are removed and the guest runs on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from vmscope.client.errors import StubError
from vmscope.client.helpers.qemu import QmpError
from vmscope.client.inspect_cli import add_connection_options
from vmscope.client.transport import ConnectionLost, StubTimeout
from vmscope.vmi.errors import VmiError

FORMATS = ("d", "x", "s", "u")  # signed decimal, hex, string (user for syscalls), user string


def _arg_spec(text: str) -> list[tuple[str, str | None]]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, fmt = item.partition(":")
        if fmt and fmt not in FORMATS:
            raise argparse.ArgumentTypeError(f"--args {item!r}: format must be one of {', '.join(FORMATS)} "
                                             "(d: decimal, x: hex, s: string, u: user string)")
        out.append((name, fmt or None))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmscope trace", description=__doc__.split("\n\n")[0])
    p.add_argument("symbols", nargs="+", metavar="SYMBOL", help="kernel function(s) to probe, e.g. __x64_sys_openat")
    add_connection_options(p)
    p.add_argument("--args", type=_arg_spec, metavar="NAME[:FMT],...",
                   help="arguments to show (default: all), by name (from BTF or the syscall's metadata) or "
                        "argN; FMT d, x, s (string) or u (user string)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N hits")
    p.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--pid", type=int, help="only hits in this process (tgid)")
    p.add_argument("--comm", help="only hits in tasks with this command name")
    p.add_argument("--hardware", action="store_true", help="hardware breakpoints (kernel text stays untouched)")
    return p


class HexText(str):
    """A value shown in hex: a string in JSON, unquoted on a line."""


def _format_value(hit, name: str, value: int, fmt: str | None, decoded) -> str | int:
    if fmt is None:
        return decoded.get(name, value)
    if fmt == "d":
        return value - (1 << 64) if value >> 63 else value
    if fmt == "x":
        return HexText(hex(value))
    try:
        return hit.user_string(value) if fmt == "u" else hit.string(value)
    except VmiError:
        return f"<unreadable 0x{value:x}>"


def hit_record(hit, spec) -> dict:
    """One hit as a dict: what a line (or a JSON object) shows."""
    task = hit.task
    decoded = hit.decoded_args()
    args = hit.args
    if spec is None:
        shown = decoded
    else:
        shown = {}
        for name, fmt in spec:
            if name.startswith("arg") and name[3:].isdigit() and name not in args.names:
                value = args[int(name[3:])]
            else:
                value = args[name]
            shown[name] = _format_value(hit, name, value, fmt, decoded)
    return {"time": round(hit.time, 6), "cpu": hit.cpu, "pid": task.pid, "tgid": task.tgid, "comm": task.comm,
            "function": hit.symbol, "args": shown}


def _line(rec: dict) -> str:
    def show(v):
        if isinstance(v, HexText):
            return str(v)
        return json.dumps(v) if isinstance(v, str) else (hex(v) if isinstance(v, int) and v > 0xFFFF else str(v))

    args = ", ".join(f"{k}={show(v)}" for k, v in rec["args"].items())
    return f"{rec['time']:10.6f} cpu{rec['cpu']:<3} {rec['pid']:>7} {rec['comm']:<16} {rec['function']}({args})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = sys.stderr
    if not args.gdb:
        print("vmscope trace: error: give --gdb HOST:PORT (and --qmp HOST:PORT for shared RAM)", file=err)
        return 2
    from vmscope.client.session import Inspector

    by_comm: Counter[str] = Counter()
    result = None
    status = 0
    try:
        with Inspector(args.gdb, args.qmp, memory=args.memory, timeout=args.timeout, system_map=args.system_map,
                       disk_cache=not args.no_cache) as vm:
            def condition(hit) -> bool:
                t = hit.task
                return (args.pid is None or t.tgid == args.pid) and (args.comm is None or t.comm == args.comm)

            def on_hit(hit) -> None:
                rec = hit_record(hit, args.args)
                by_comm[rec["comm"]] += 1
                print(json.dumps(rec) if args.json else _line(rec), flush=True)

            filtered = args.pid is not None or args.comm is not None
            vm.probe(args.symbols, on_hit, condition=condition if filtered else None, hardware=args.hardware)
            try:
                result = vm.run(hits=args.count, seconds=args.seconds)
            except KeyboardInterrupt:
                pass  # Ctrl-C: the summary, then leave (the run has cleaned up)
            except SystemExit as e:
                status = int(e.code or 0)  # SIGTERM: the same, with its status
    except (VmiError, StubError, QmpError, ConnectionLost, StubTimeout, OSError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"vmscope trace: error: {msg}", file=err)
        return 1
    hits = sum(by_comm.values())
    seconds = result.seconds if result else None
    summary = {"hits": hits, "seconds": round(seconds, 3) if seconds is not None else None,
               "by_comm": dict(by_comm.most_common()), "ended_by": result.reason if result else "signal"}
    if args.json:
        print(json.dumps({"summary": summary}), flush=True)
    else:
        rate = f", {hits / seconds:.1f}/s" if seconds else ""
        top = ", ".join(f"{c} {n}" for c, n in by_comm.most_common(10))
        print(f"{hits} hits{rate} ({summary['ended_by']}){': ' + top if top else ''}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
