"""Benchmark: pure RSP against the shared-RAM helper on the same QEMU guest.

Boots the Debian cloud kernel under ``qemu-system-x86_64 -accel tcg`` with
RAM in a shared file, then measures, both ways:

- a 64 MiB guest-physical read;
- ``ps`` cold (``vmscope inspect ps --no-cache`` from connect to table: find
  the kernel, decode kallsyms, read BTF, walk the tasks) and with the
  per-kernel symbol cache filled;
- ``ps`` warm (an attached session lists the tasks again after the guest
  ran, so every page-table walk and task read is redone).

Prints each number and the ratio (shared RAM over RSP).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from contextlib import redirect_stdout

from vmscope.client.helpers.qemu_launch import QemuGuest
from vmscope.client.session import Inspector


def _time(fn, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(gdb_port: int = 16900, qmp_port: int = 16901, read_mib: int = 64, quiet: bool = False) -> dict:
    from vmscope.images.linux import READY_MARKER, build_linux_guest
    from vmscope.client.inspect_cli import main as inspect_main

    image = build_linux_guest(mode="shell", modules=["irqbypass", "xor"], quiet=True)
    results: dict[str, float] = {}
    with QemuGuest(str(image.vmlinuz), str(image.initramfs), gdb_port, qmp_port) as vm:
        vm.console.wait_for(READY_MARKER.encode())
        vm.console.run("true")
        size = read_mib << 20
        for path in ("shared", "rsp"):
            with Inspector(vm.gdb, vm.qmp, memory=path) as ins:
                results[f"read_{path}_s"] = _time(lambda: ins.phys.read(16 << 20, size), 3 if path == "shared" else 1)
                if path == "shared":
                    buf = bytearray(size)
                    results["readinto_shared_s"] = _time(lambda: ins.phys.readinto(16 << 20, buf), 3)
                kernel = ins.kernel()
                kernel.tasks()  # BTF loaded

                def warm_ps():
                    ins.cache.invalidate()
                    kernel.tasks()

                results[f"ps_warm_{path}_s"] = _time(warm_ps, 5)
                results["tasks"] = len(kernel.tasks())
            sink = io.StringIO()
            with redirect_stdout(sink):
                results[f"ps_cold_{path}_s"] = _time(
                    lambda: inspect_main(["--gdb", vm.gdb, "--qmp", vm.qmp, "--memory", path, "--no-cache",
                                          "--json", "ps"]))
                inspect_main(["--gdb", vm.gdb, "--qmp", vm.qmp, "--memory", path, "--json", "ps"])  # fill cache
                results[f"ps_cached_{path}_s"] = _time(
                    lambda: inspect_main(["--gdb", vm.gdb, "--qmp", vm.qmp, "--memory", path, "--json", "ps"]), 3)
    results["read_shared_GBps"] = size / results["read_shared_s"] / 1e9
    results["readinto_shared_GBps"] = size / results["readinto_shared_s"] / 1e9
    results["read_rsp_MBps"] = size / results["read_rsp_s"] / 1e6
    results["read_ratio"] = results["read_rsp_s"] / results["read_shared_s"]
    results["ps_warm_ratio"] = results["ps_warm_rsp_s"] / results["ps_warm_shared_s"]
    results["ps_cold_ratio"] = results["ps_cold_rsp_s"] / results["ps_cold_shared_s"]
    results["ps_cached_ratio"] = results["ps_cached_rsp_s"] / results["ps_cached_shared_s"]
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--read-mib", type=int, default=64)
    p.add_argument("--ports", type=int, nargs=2, default=(16900, 16901), metavar=("GDB", "QMP"))
    args = p.parse_args(argv)
    r = run(args.ports[0], args.ports[1], args.read_mib)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    mib = args.read_mib
    print(f"{mib} MiB physical read: shared RAM {r['read_shared_s'] * 1e3:8.1f} ms ({r['read_shared_GBps']:.2f} GB/s)"
          f" | RSP {r['read_rsp_s']:7.2f} s ({r['read_rsp_MBps']:.1f} MB/s) | {r['read_ratio']:.0f}x")
    print(f"{mib} MiB into a reused buffer: shared RAM {r['readinto_shared_s'] * 1e3:8.1f} ms "
          f"({r['readinto_shared_GBps']:.2f} GB/s)")
    print(f"ps warm ({r['tasks']} tasks):  shared RAM {r['ps_warm_shared_s'] * 1e3:8.2f} ms"
          f" | RSP {r['ps_warm_rsp_s'] * 1e3:7.1f} ms | {r['ps_warm_ratio']:.1f}x")
    print(f"ps cold (inspect ps --no-cache):  shared RAM {r['ps_cold_shared_s']:6.2f} s "
          f" | RSP {r['ps_cold_rsp_s']:6.2f} s | {r['ps_cold_ratio']:.1f}x")
    print(f"ps (inspect ps, symbols cached):  shared RAM {r['ps_cached_shared_s']:6.2f} s "
          f" | RSP {r['ps_cached_rsp_s']:6.2f} s | {r['ps_cached_ratio']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
