#!/usr/bin/env python3
"""``vmscope fleet`` throughput on this machine: targets per second against
the number of Dask workers (1, 2, 4), and what the per-build cache saves
(the first target of a kernel build against the later ones).

The targets are core files of one Debian guest booted here under QEMU TCG
(KASLR on), dumped with ``vmscope dump`` a few times (each dump its own
file) and listed under many names, so every run does the same work; the
per-process caches start empty in every run (new workers, ``--no-disk``
style: the disk cache is pointed at a fresh directory).

    python bench/fleet.py [--targets 32] [--dumps 4] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from rich.console import Console  # noqa: E402


def make_cores(d: str, dumps: int) -> list[str]:
    from tests.support import free_port
    from vmscope.client.helpers.qemu_launch import QemuGuest
    from vmscope.images.linux import READY_MARKER, build_linux_guest

    image = build_linux_guest(mode="shell", modules=["crc32_generic"], quiet=True)
    paths = []
    with QemuGuest(str(image.vmlinuz), str(image.initramfs), free_port(), free_port(), memory_mib=192) as g:
        g.console.wait_for(READY_MARKER.encode())
        for i in range(dumps):
            g.console.run(f"sleep {600 + i} & true")  # each dump a little different
            path = os.path.join(d, f"dump{i}.core")
            r = subprocess.run([sys.executable, "-m", "vmscope", "dump", "--gdb", g.gdb, "--qmp", g.qmp, path],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr)
            paths.append(path)
    return paths


def run(targets, workers: int, cache_dir: str) -> tuple[float, list[dict]]:
    from dask.distributed import Client, LocalCluster

    from vmscope.fleet.cli import run_fleet

    os.environ["VMSCOPE_CACHE"] = cache_dir  # workers inherit it: no cache from an earlier run
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        client.run(lambda: None)  # workers up before the clock starts
        t0 = time.monotonic()
        results, _ = run_fleet(client, targets, "ps", 30.0, Console(stderr=True, quiet=True))
        return time.monotonic() - t0, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--dumps", type=int, default=4)
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()
    from vmscope.fleet.targets import Target

    out = Console(width=120, highlight=False)
    with tempfile.TemporaryDirectory() as d:
        out.print(f"[bold]booting a Debian guest under QEMU TCG and dumping it {args.dumps} times...[/]")
        cores = make_cores(d, args.dumps)
        targets = [Target(f"t{i}", core=cores[i % len(cores)]) for i in range(args.targets)]
        out.print(f"{args.targets} targets over {len(cores)} core files of one kernel build; "
                  f"{os.cpu_count()} CPUs on this machine\n")
        out.print(f"{'workers':>7}  {'seconds':>8}  {'targets/s':>9}  {'first target':>12}  "
                  f"{'later (median)':>14}  {'decoded':>7}  {'from a cache':>12}")
        for workers in [int(w) for w in args.workers.split(",")]:
            took, results = run(targets, workers, tempfile.mkdtemp(dir=d))
            ok = [r for r in results if r["ok"]]
            first = results[0]["seconds"]
            later = statistics.median(r["seconds"] for r in results[1:]) if len(results) > 1 else float("nan")
            decoded = sum(1 for r in ok if r.get("symbols") == "decoded")
            out.print(f"{workers:>7}  {took:>8.1f}  {len(ok) / took:>9.2f}  {first:>11.2f}s  {later:>13.2f}s  "
                      f"{decoded:>7}  {len(ok) - decoded:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
