"""Boot-to-ready time of a stock Debian kernel: `vmscope run` vs QEMU, both on KVM.

Both run inside the nested lab's L1 (real KVM) on the same kernel,
initramfs, memory and vCPU count; the clock runs inside L1, from starting
the process to the guest's `vmscope-linux-ready` line on the console, so the
lab's command channel is not measured. On x86_64 QEMU is the host's own
`qemu-system-x86_64`, carried into L1 with the shared libraries `ldd` lists
and its firmware (SeaBIOS, the Linux option ROMs). With ``--arch aarch64``
the lab is the arm64 one and QEMU is Debian's arm64 `qemu-system-aarch64`
(``-M virt -enable-kvm``, from the qemu-system-arm package and its library
packages, found by DT_NEEDED as the lab finds Python's), against
`vmscope run --arch aarch64`.

    python3 bench/linux_boot.py [--arch aarch64] [--runs 5] [--cpus 2] [--mem 512] [--decompressor]

Prints each run, the medians and the ratio vmscope / QEMU (the target is
0.5 or less). Two more figures bound what any VMM written in Python can
reach in this lab, measured in the same runs (x86_64): ``python-floor``,
Python's own start-up in L1 to printing the marker (every Python VMM pays
it before its guest's first instruction), and ``qemu-pvh``, QEMU given the
shortcut vmscope takes (the same decompressed vmlinux from L1's cache,
entered through its PVH note: no decompressor, no real-mode set-up), the
time this guest needs to get ready under a VMM written in C. vmscope boots the bzImage directly (decompressed on the host,
placed with KASLR and relocated by the VMM, entered at startup_64: the
default); the first boot of a kernel build decompresses it into the cache,
which is done once, untimed, before the runs (and its time printed).
``--decompressor`` also times ``vmscope run --boot decompressor`` (the
kernel's own decompressor) in each run.

L1 is tuned as a host running vmscope should be: shared-memory transparent
huge pages on request (``shmem_enabled = advise``), so vmscope's memfd RAM
gets 2 MiB pages as QEMU's anonymous RAM does under THP ``always``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

# the checkout, not bench/ (bench/inspect.py would shadow the standard library's inspect)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

QEMU_DIR = "/opt/qemu"
READY = "vmscope-linux-ready"
CMDLINE = "console=ttyS0 quiet panic=-1"

# Runs inside L1: start a command, stop the clock at the ready marker, kill it.
TIMER = r"""
import json, os, select, signal, subprocess, sys, time
argv, marker, limit = json.loads(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
t0 = time.monotonic()
p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     start_new_session=True)
seen = b""
elapsed = None
while time.monotonic() - t0 < limit:
    r, _, _ = select.select([p.stdout], [], [], 1.0)
    if r:
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        seen += chunk
        if marker in seen:
            elapsed = time.monotonic() - t0
            break
os.killpg(p.pid, signal.SIGKILL)
p.wait()
print(json.dumps({"seconds": elapsed, "tail": seen[-1500:].decode("utf-8", "replace")}))
"""

# Runs inside L1 before the timed runs: the first direct boot of a kernel build decompresses it.
PRIME = r"""
import sys, time
from vmscope.kvm.boot.payload import cached_vmlinux
t0 = time.monotonic()
elf, _, cached = cached_vmlinux(sys.argv[1])
print(f"{time.monotonic() - t0:.2f} s ({'already cached' if cached else 'decompressed'})")
print(elf)
"""


def qemu_files() -> dict[str, str]:
    """qemu-system-x86_64, its libraries and the firmware a PC boot reads."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        sys.exit("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    files = {f"{QEMU_DIR}/bin/qemu-system-x86_64": qemu}
    out = subprocess.run(["ldd", qemu], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split("=>")
        if len(parts) == 2 and parts[1].strip().startswith("/"):
            lib = parts[1].split()[0]
            files[f"{QEMU_DIR}/lib/{Path(lib).name}"] = str(Path(lib).resolve())
    for name in ("bios-256k.bin", "linuxboot_dma.bin", "pvh.bin", "kvmvapic.bin", "vgabios-stdvga.bin", "efi-e1000.rom"):
        for d in ("/usr/share/seabios", "/usr/share/qemu", "/usr/lib/ipxe/qemu"):
            p = Path(d) / name
            if p.exists():
                files[f"{QEMU_DIR}/share/{name}"] = str(p.resolve())
                break
    return files


def qemu_files_arm64() -> dict[str, str]:
    """Debian's arm64 qemu-system-aarch64 and every library it loads, from
    the packages it depends on (transitively, libraries only)."""
    from vmscope.images import debian
    from vmscope.lab import foreign

    triplet, _ = foreign.ARCHES["arm64"]
    todo, seen = ["qemu-system-arm"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [d for d in debian.depends(name, "arm64") if d.startswith("lib") or d == "zlib1g"]
    roots = foreign.RootSet(foreign.fetch_packages(sorted(seen), "arm64", quiet=False))
    binary = roots.find("/usr/bin/qemu-system-aarch64")
    if binary is None:
        sys.exit("qemu-system-arm:arm64 holds no /usr/bin/qemu-system-aarch64")
    files = {f"{QEMU_DIR}/bin/qemu-system-aarch64": str(binary)}
    pending, done = list(foreign.elf_needed(binary)[0]), set()
    while pending:
        soname = pending.pop()
        if soname in done:
            continue
        done.add(soname)
        lib = roots.find(f"/lib/{triplet}/{soname}") or roots.find(f"/usr/lib/{triplet}/{soname}")
        if lib is None:
            sys.exit(f"qemu-system-aarch64 needs {soname}, which no package provided")
        files[f"{QEMU_DIR}/lib/{soname}"] = str(lib)
        pending += foreign.elf_needed(lib)[0]
    return files


def commands(cpus: int, mem: int, guests: str, decompressor: bool = False,
             arch: str = "x86_64", vmlinux: str | None = None) -> dict[str, list[str]]:
    kernel, initrd = f"{guests}/vmlinuz", f"{guests}/initramfs.cpio.gz"
    if arch == "aarch64":
        return {
            "vmscope": ["python3", "-m", "vmscope", "run", "--arch", "aarch64", "--accel", "kvm", "--kernel", kernel,
                        "--initrd", initrd, "--cpus", str(cpus), "--mem", str(mem), "--append", CMDLINE],
            "qemu": ["env", f"LD_LIBRARY_PATH={QEMU_DIR}/lib", f"{QEMU_DIR}/bin/qemu-system-aarch64",
                     "-M", "virt,gic-version=3", "-cpu", "host", "-enable-kvm", "-nodefaults", "-no-user-config",
                     "-nographic", "-serial", "stdio", "-m", str(mem), "-smp", str(cpus),
                     "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE.replace("ttyS0", "ttyAMA0")],
        }
    vmscope = ["python3", "-m", "vmscope", "run", "--accel", "kvm", "--kernel", kernel, "--initrd", initrd,
               "--cpus", str(cpus), "--mem", str(mem), "--append", CMDLINE, "--boot", "direct"]
    extra = {"vmscope-decompressor": [*vmscope, "--boot", "decompressor"]} if decompressor else {}
    qemu = ["env", f"LD_LIBRARY_PATH={QEMU_DIR}/lib", f"{QEMU_DIR}/bin/qemu-system-x86_64",
            "-L", f"{QEMU_DIR}/share", "-enable-kvm", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-m", str(mem), "-smp", str(cpus)]
    bounds = {}
    if vmlinux:
        bounds = {
            "qemu-pvh": [*qemu, "-kernel", vmlinux, "-initrd", initrd, "-append", CMDLINE],
            "python-floor": ["python3", "-c", f"print({READY!r})"],
        }
    return {
        "vmscope": vmscope,
        **extra,
        "qemu": [*qemu, "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE],
        **bounds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("x86_64", "aarch64"), default="x86_64",
                    help="the lab and guest architecture (aarch64: the arm64 nested lab)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--mem", type=int, default=512, help="guest MiB")
    ap.add_argument("--limit", type=float, default=300, help="seconds a boot may take")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--decompressor", action="store_true",
                    help="also time vmscope with the kernel's own decompressor (--boot decompressor)")
    args = ap.parse_args(argv)

    from vmscope.lab import Lab

    files = qemu_files_arm64() if args.arch == "aarch64" else qemu_files()
    with Lab(arch=args.arch, cpus=2, mem_mib=2048, port_range=(19100, 19199), extra_files=files,
             boot_timeout=900) as lab:
        guests = lab.run("echo $VMSCOPE_LAB_GUESTS/linux", check=True).stdout.strip()
        lab.run("echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled", check=True)
        vmlinux = None
        if args.arch == "x86_64":  # an arm64 Image has no decompressor: nothing to prime
            prime = lab.run(["python3", "-c", PRIME, f"{guests}/vmlinuz"], timeout=args.limit, check=True)
            took, vmlinux = prime.stdout.strip().splitlines()[-2:]
            print(f"decompressing the bzImage into L1's cache, once: {took}", flush=True)
        cmds = commands(args.cpus, args.mem, guests, args.decompressor, args.arch, vmlinux)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for i in range(args.runs):
            for name, argv_ in cmds.items():
                r = lab.run(["python3", "-c", TIMER, json.dumps(argv_), READY, str(args.limit)],
                            timeout=args.limit + 60, check=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                if res["seconds"] is None:
                    print(f"{name}: no {READY} in {args.limit} s; console tail:\n{res['tail']}", file=sys.stderr)
                    return 1
                times[name].append(res["seconds"])
                print(f"run {i + 1}: {name:20s} {res['seconds']:7.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["vmscope"] / med["qemu"]
    print(f"median boot-to-ready ({args.arch}, {args.runs} runs, {args.cpus} vCPUs, {args.mem} MiB): "
          f"vmscope {med['vmscope']:.2f} s, qemu -enable-kvm {med['qemu']:.2f} s, ratio {ratio:.2f}x "
          f"(target <= 0.5x)")
    if "vmscope-decompressor" in med:
        print(f"vmscope with the kernel's own decompressor: {med['vmscope-decompressor']:.2f} s, "
              f"ratio {med['vmscope-decompressor'] / med['qemu']:.2f}x")
    if "qemu-pvh" in med:
        target = med["qemu"] / 2
        print(f"bounds: QEMU through the PVH entry (no decompressor) {med['qemu-pvh']:.2f} s "
              f"(vmscope / that {med['vmscope'] / med['qemu-pvh']:.2f}x); Python's start-up in L1 "
              f"{med['python-floor']:.2f} s; 0.5x of QEMU is {target:.2f} s, which leaves "
              f"{target - med['python-floor']:.2f} s after Python's start-up for everything else, "
              f"the guest's own boot included")
    if args.json:
        print(json.dumps({"runs": times, "median": med, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
