"""``vmscope guest linux --out DIR``: write a bootable Linux guest.

Also runnable as ``python -m vmscope.images linux --out DIR``. ``main(argv)``
takes the arguments after ``guest``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmscope guest",
                                description="Build guest images from Debian's packages (cached).")
    sub = p.add_subparsers(dest="kind", required=True)
    lx = sub.add_parser("linux", help="Debian cloud kernel + busybox initramfs",
                        description="Writes DIR/vmlinuz and DIR/initramfs.cpio.gz. The guest "
                        "prints vmscope-linux-ready on its console, then starts a shell "
                        "(default) or runs a workload and powers off (--workload).")
    lx.add_argument("--out", required=True, type=Path, help="directory to write the images into")
    lx.add_argument("--workload", action="store_true",
                    help="run the workload and power off instead of starting a shell")
    lx.add_argument("--seconds", type=int, default=5,
                    help="how long the fixed workload loops (default 5; the kernel "
                    "command line vmscope.seconds=N overrides it per boot)")
    lx.add_argument("--workload-script", type=Path, metavar="FILE",
                    help="a shell script to run instead of the fixed workload")
    lx.add_argument("--module", action="append", default=[], metavar="NAME",
                    help="load this kernel module (and its dependencies) at boot; repeatable")
    lx.add_argument("--add", action="append", default=[], metavar="HOST:IMAGE",
                    help="copy a host file or directory into the image; repeatable")
    lx.add_argument("--arch", choices=("amd64", "arm64"), default=None,
                    help="Debian architecture of the guest (default: the host's; arm64 needs "
                    "dpkg --add-architecture arm64 && apt-get update)")
    lx.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from vmscope.images.debian import PackageError
    from vmscope.images.initramfs import InitramfsError
    from vmscope.images.kernel import KernelError
    from vmscope.images.linux import GuestImageError, build_linux_guest

    files = {}
    for spec in args.add:
        host, sep, dest = spec.partition(":")
        if not sep or not dest.startswith("/"):
            print(f"vmscope guest: --add wants HOST:/IMAGE/PATH, got {spec!r}", file=sys.stderr)
            return 2
        files[dest] = host
    workload = None
    if args.workload_script:
        try:
            workload = args.workload_script.read_text()
        except OSError as exc:
            print(f"vmscope guest: cannot read {args.workload_script}: {exc.strerror}", file=sys.stderr)
            return 2
    try:
        guest = build_linux_guest(args.out, mode="workload" if args.workload else "shell",
                                  modules=args.module, workload=workload, files=files,
                                  seconds=args.seconds, quiet=args.quiet, arch=args.arch)
    except (PackageError, KernelError, GuestImageError, InitramfsError) as exc:
        print(f"vmscope guest: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {guest.kernel_version}")
    print(f"wrote {guest.vmlinuz}")
    print(f"wrote {guest.initramfs}")
    print("boot it with: " + " ".join(
        a if " " not in a else repr(a) for a in guest.qemu_argv()))
    arch = "aarch64" if guest.arch == "arm64" else "x86_64"
    print(f"or with vmscope's VMM (on an {arch} host with /dev/kvm, or in `vmscope lab run --arch {arch}`): "
          f"vmscope run --arch {arch} --kernel {guest.vmlinuz} --initrd {guest.initramfs} --cpus 2 --mem 512")
    return 0


if __name__ == "__main__":
    sys.exit(main())
