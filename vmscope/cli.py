"""The ``vmscope`` command.

``vmscope run``     boot a guest (KVM, or the emulated CPU), optionally with a GDB stub
``vmscope guest``   write guest images (the embedded demo ELF, a Debian Linux kernel + initramfs)
``vmscope inspect`` attach to any gdbstub (or open a core file) and look inside the guest
``vmscope dump``    write a live guest's memory as an ELF core
``vmscope fleet``   one report over many guests and core files, on Dask
``vmscope trace``   probe kernel functions: one line per hit with task and arguments
``vmscope lab``     the nested KVM lab (real KVM inside QEMU/TCG) for machines without VMX/SVM
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

from vmscope import __version__

DEFAULT_GDB_HOST = "127.0.0.1"


def _console_input_fd() -> int | None:
    """The fd whose bytes go to the guest's serial port: stdin, terminal or
    not (``printf 'ls\\n' | vmscope run ...`` types into the guest's shell,
    as QEMU's ``-serial stdio`` does). None when there is no stdin."""
    try:
        fd = sys.stdin.fileno() if sys.stdin is not None else None
        if fd is not None:
            os.fstat(fd)
    except (OSError, ValueError):
        return None
    return fd


def _stack_dumps_on_sigusr1(state_report=None) -> None:
    """``kill -USR1 PID`` prints every thread's Python stack on stderr (vCPU
    threads, the stub, the console), then ``state_report()``'s lines (run
    control, each vCPU, the UART's interrupt state, the debugger's
    breakpoints), and the VMM runs on: how to see where a VMM that seems
    hung is waiting, without a debugger for Python.

    A Python-level handler, not ``faulthandler.register``: faulthandler
    reads the other threads' frames without the GIL while they run, and
    with vCPU threads starting it crashed the VMM (SIGSEGV, about 1 run in
    40 with signals at the first guest output). The handler runs in the
    main thread, which waits on an event that a signal interrupts, and
    reads the frames under the GIL. A process wedged with the GIL held
    needs ``py-spy dump --pid PID`` instead."""
    import signal

    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: _write_every_threads_stack(2, state_report))


def _write_every_threads_stack(fd: int, state_report=None) -> None:
    """Every thread's stack, most recent call first, as faulthandler
    prints them, then the machine's state; written with os.write because
    the handler may run while the main thread is inside a write to
    sys.stderr (a second write to the same buffered stream from the
    handler would raise)."""
    import traceback

    # Not threading.enumerate(): it takes a lock that the main thread,
    # where this runs, may hold at the moment of the signal (Thread.start)
    # and would wait on forever. Copying the registry is one C call under the GIL.
    names = {ident: t.name for ident, t in dict(getattr(threading, "_active", {})).items()}
    here = threading.get_ident()
    lines = []
    for ident, frame in sys._current_frames().items():
        mark = " (this thread)" if ident == here else ""
        lines.append(f"Thread 0x{ident:016x} {names.get(ident, '?')}{mark} (most recent call first):\n")
        lines.extend(reversed(traceback.format_stack(frame)))
        lines.append("\n")
    if state_report is not None:
        try:
            lines.extend(f"{line}\n" for line in state_report())
        except Exception as e:  # a report half made by a racing thread: say so, keep the stacks
            lines.append(f"machine state unavailable: {type(e).__name__}: {e}\n")
    data = "".join(lines).encode(errors="replace")
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return  # stderr closed: nothing to show the stacks on


def _end_on_sigterm() -> None:
    """SIGTERM ends ``vmscope run`` as Ctrl-A x does: the stub removes its
    breakpoints and its Unix socket, the terminal leaves raw mode, the VM
    is torn down (the default action would skip all of that)."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _err(message: str) -> None:
    print(f"vmscope: {message}", file=sys.stderr, flush=True)


# --- run ------------------------------------------------------------------------


def _host_arch() -> str:
    m = os.uname().machine  # not platform.machine(): the platform module costs an import at every start
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def kvm_usable() -> str | None:
    """None when /dev/kvm can be opened, else the reason it cannot."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None


def make_machine(config, accel: str):
    """The back end for ``accel`` (kvm, emu or auto)."""
    from vmscope.machine import MachineUnavailable

    if accel == "auto":
        why = kvm_usable()
        if why is None and config.arch != _host_arch():
            why = f"the host is {_host_arch()}, the guest {config.arch}"
        if why is None:
            accel = "kvm"
        else:
            _err(f"KVM not usable ({why}); using the emulated CPU (slower)")
            accel = "emu"
    if accel == "kvm":
        if config.arch != _host_arch():
            raise MachineUnavailable(f"KVM runs {_host_arch()} guests here, not {config.arch}; use --accel emu")
        if config.arch == "aarch64":
            from vmscope.kvm.arm64 import Arm64KvmMachine

            return Arm64KvmMachine(config)
        from vmscope.kvm import KvmMachine

        return KvmMachine(config)
    from vmscope.emu import EmuMachine

    return EmuMachine(config)


def cmd_run(args: argparse.Namespace) -> int:
    from vmscope.startup import StartupClock

    clock = StartupClock()
    try:
        clock.enter("importing the stub" if args.gdb is not None else "checking the images")
        from vmscope.machine import ImageError, MachineConfig, MachineUnavailable

        if args.gdb is not None:
            from vmscope.gdbserver.transport import GdbServer, parse_address

        for label, path in (("kernel", args.kernel), ("initrd", args.initrd)):
            if path is not None and not path.is_file():
                _err(f"{label} image {path}: no such file")
                return 2
        config = MachineConfig(
            arch=args.arch, kernel=args.kernel, initrd=args.initrd, append=args.append or "",
            mem_mib=args.mem, cpus=args.cpus,
            serial_in=_console_input_fd(), boot=args.boot,
        )
        server = None
        try:
            unix_path = None
            if args.gdb is not None and args.gdb.startswith("unix:"):
                unix_path = args.gdb[len("unix:"):]
                if not unix_path:
                    _err("--gdb unix:PATH: the path is missing")
                    return 2
            elif args.gdb is not None:
                try:
                    host, port = parse_address(args.gdb, DEFAULT_GDB_HOST)
                except ValueError as e:
                    _err(f"--gdb: {e}")
                    return 2
            clock.enter(f"creating the machine ({args.accel}: VM, memory, kernel, devices, vCPUs)")
            machine = make_machine(config, args.accel)
            if args.gdb is not None:
                clock.enter("opening the gdb port")
                try:
                    if unix_path is not None:
                        server = GdbServer(machine.debug_target(), unix=unix_path)
                    else:
                        server = GdbServer(machine.debug_target(), host, port)
                except OSError as e:
                    machine.shutdown()
                    where = unix_path if unix_path is not None else f"{host}:{port}"
                    _err(f"cannot listen for gdb on {where}: {e.strerror or e}")
                    return 2
                if server.reachable_from_elsewhere:
                    from vmscope.gdbserver.transport import NO_AUTH_WARNING

                    _err("warning: " + NO_AUTH_WARNING.format(where=server.where))
                _err(f"waiting for gdb on {server.where} (in gdb: target remote {server.where}); "
                     "the guest starts when it continues")
                server_thread = threading.Thread(target=server.serve_forever, name="gdbstub", daemon=True)
                server_thread.start()
            _stack_dumps_on_sigusr1(getattr(machine, "state_report", None))
            _end_on_sigterm()
            clock.enter("starting the vCPU threads")
            machine.start(paused=args.gdb is not None)
            clock.done()
        except (ImageError, MachineUnavailable) as e:
            clock.done()
            _err(str(e))
            return 2
        from vmscope.devices.console import raw_terminal

        try:
            # raw mode: every key (Ctrl-C too) goes to the guest; Ctrl-A x quits
            with raw_terminal(config.serial_in) if config.serial_in is not None else contextlib.nullcontext():
                status = machine.wait()
        except KeyboardInterrupt:
            status = 130
        finally:
            if server is not None:
                server.close()
                server_thread.join(5)  # lets the last stop reply ("W", the exit status) reach GDB
            machine.shutdown()
        return int(status or 0)
    finally:
        clock.done()  # a no-op once start-up ended; here for the early returns


# --- guest ------------------------------------------------------------------------


def cmd_guest(args: argparse.Namespace) -> int:
    if args.what != "linux":
        if args.rest:
            _err(f"guest {args.what}: unexpected arguments {' '.join(args.rest)}")
            return 2
        from vmscope.guests import write_guest

        print(write_guest(args.out, args.what, args.arch))
        return 0
    from vmscope.images import cli as images_cli

    debian_arch = {"x86_64": "amd64", "aarch64": "arm64"}[args.arch]
    return images_cli.main(["linux", "--out", str(args.out), "--arch", debian_arch, *args.rest])


# --- wiring -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmscope", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"vmscope {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for protocol detail)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a guest, optionally under a GDB stub",
                         description="Boot a guest. Without --kernel, the embedded demo guest. "
                                     "On a terminal, Ctrl-A X quits.")
    run.add_argument("--kernel", type=Path, help="Linux bzImage or PVH ELF kernel (default: the embedded demo guest)")
    run.add_argument("--initrd", type=Path, help="initial ramdisk")
    run.add_argument("--append", help="kernel command line")
    run.add_argument("--mem", type=int, default=256, metavar="MIB", help="guest RAM in MiB (default 256)")
    run.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    run.add_argument("--boot", choices=["direct", "decompressor"], default="decompressor",
                     help="x86 KVM, bzImage: 'decompressor' (default) runs the kernel's own; 'direct' "
                          "decompresses the kernel on the host (cached), places it with KASLR and enters "
                          "startup_64 (faster, and kernel symbols from the first instruction)")
    run.add_argument("--gdb", metavar="[HOST:]PORT|unix:PATH",
                     help="serve GDB here and wait for it before the first instruction (host defaults to 127.0.0.1; "
                          "unix:PATH: a Unix socket only its owner can use)")
    run.add_argument("--arch", choices=["x86_64", "aarch64"], default=None, help="guest architecture (default: host's)")
    run.add_argument("--accel", choices=["auto", "kvm", "emu"], default="auto",
                     help="kvm, the emulated CPU, or auto (KVM when usable; default)")
    run.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                     help="log more (-vv for protocol detail); also before 'run'")
    run.set_defaults(func=cmd_run)

    guest = sub.add_parser("guest", help="write guest images")
    guest.add_argument("what", choices=["demo", "idt", "walk", "linux"],
                       help="demo: the embedded bare-metal ELF; idt: a second test guest with its own IDT and INT3s; "
                            "walk (x86_64): a standard PVH guest without vmscope's conventions; "
                            "linux: Debian kernel + busybox initramfs (more options: vmscope guest linux --out DIR --help)")
    guest.add_argument("--out", type=Path, required=True, help="output directory")
    guest.add_argument("--arch", choices=["x86_64", "aarch64"], default="x86_64")
    guest.set_defaults(func=cmd_guest, rest=[])

    inspect = sub.add_parser("inspect", help="attach to a gdbstub and inspect the guest", add_help=False)
    inspect.add_argument("rest", nargs=argparse.REMAINDER)
    inspect.set_defaults(func=lambda a: _delegate("vmscope.client.inspect_cli", a.rest))

    dump = sub.add_parser("dump", help="write a live guest's memory as an ELF core (QEMU's dump format)",
                          add_help=False)
    dump.add_argument("rest", nargs=argparse.REMAINDER)
    dump.set_defaults(func=lambda a: _delegate("vmscope.dump.cli", a.rest))

    fleet = sub.add_parser("fleet", help="ps/lsmod/dmesg/modules-diff over many guests and core files, on Dask",
                           add_help=False)
    fleet.add_argument("rest", nargs=argparse.REMAINDER)
    fleet.set_defaults(func=lambda a: _delegate("vmscope.fleet.cli", a.rest))

    trace = sub.add_parser("trace", help="probe kernel functions: task and arguments at each hit", add_help=False)
    trace.add_argument("rest", nargs=argparse.REMAINDER)
    trace.set_defaults(func=lambda a: _delegate("vmscope.client.trace_cli", a.rest))

    lab = sub.add_parser("lab", help="the nested KVM lab (real KVM inside QEMU/TCG)", add_help=False)
    lab.add_argument("rest", nargs=argparse.REMAINDER)
    lab.set_defaults(func=lambda a: _delegate("vmscope.lab", a.rest))
    return p


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # inspect, dump, fleet, trace and lab have their own parsers: hand them everything after the word
    if argv[:1] == ["inspect"]:
        logging.basicConfig(level=logging.WARNING, format="vmscope: %(name)s: %(message)s")
        return _delegate("vmscope.client.inspect_cli", argv[1:])
    if argv[:1] == ["fleet"]:
        logging.basicConfig(level=logging.WARNING, format="vmscope: %(name)s: %(message)s")
        return _delegate("vmscope.fleet.cli", argv[1:])
    if argv[:1] == ["dump"]:
        logging.basicConfig(level=logging.WARNING, format="vmscope: %(name)s: %(message)s")
        return _delegate("vmscope.dump.cli", argv[1:])
    if argv[:1] == ["trace"]:
        logging.basicConfig(level=logging.WARNING, format="vmscope: %(name)s: %(message)s")
        return _delegate("vmscope.client.trace_cli", argv[1:])
    if argv[:1] == ["lab"]:
        logging.basicConfig(level=logging.WARNING, format="vmscope: %(name)s: %(message)s")
        return _delegate("vmscope.lab", argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "guest":
        args.rest = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="vmscope: %(name)s: %(message)s")
    if getattr(args, "arch", None) is None and args.command == "run":
        args.arch = _host_arch() if _host_arch() in ("x86_64", "aarch64") else "x86_64"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
