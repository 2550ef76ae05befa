"""``python3 -m vmscope.kvm.arm64 [--gdb HOST:PORT] [--cpus N] [--mem MIB] [ELF]``:
run a bare-metal arm64 guest (the demo by default) on this arm64 host's KVM,
optionally behind the GDB stub. What ``vmscope run --arch aarch64 --accel
kvm`` does once the CLI routes arm64 hosts here."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from vmscope.gdbserver.transport import GdbServer, parse_address
    from vmscope.kvm.arm64 import Arm64KvmMachine
    from vmscope.machine import ImageError, MachineConfig, MachineUnavailable

    p = argparse.ArgumentParser(prog="python3 -m vmscope.kvm.arm64", description=__doc__)
    p.add_argument("kernel", nargs="?", type=Path, help="bare-metal aarch64 ELF (default: the demo guest)")
    p.add_argument("--gdb", metavar="HOST:PORT", help="wait for gdb there before starting the guest")
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--mem", type=int, default=64, help="guest RAM in MiB (default 64)")
    args = p.parse_args(argv)
    config = MachineConfig(arch="aarch64", kernel=args.kernel, mem_mib=args.mem, cpus=args.cpus)
    server = None
    try:
        machine = Arm64KvmMachine(config)
    except (ImageError, MachineUnavailable, ValueError) as e:
        print(f"vmscope: {e}", file=sys.stderr)
        return 2
    if args.gdb:
        host, port = parse_address(args.gdb)
        server = GdbServer(machine.debug_target(), host, port)
        h, pt = server.address
        print(f"vmscope: waiting for gdb on {h}:{pt} (in gdb: target remote {h}:{pt}); "
              "the guest starts when it continues", file=sys.stderr, flush=True)
        threading.Thread(target=server.serve_forever, name="gdbstub", daemon=True).start()
    machine.start(paused=server is not None)
    try:
        status = machine.wait()
    except KeyboardInterrupt:
        status = 130
    finally:
        if server is not None:
            server.close()
        machine.shutdown()
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
