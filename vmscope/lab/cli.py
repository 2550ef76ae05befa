"""``vmscope lab``: the nested KVM lab from the command line.

- ``vmscope lab run [options] -- CMD...``: boot L1, run CMD there, stream its
  output, exit with its exit code. ``--put HOST_PATH:L1_PATH`` (repeatable)
  carries the user's own files in (a kernel, an initramfs).
- ``vmscope lab shell``: boot L1 with its console on this terminal (Ctrl-A X
  quits).
- ``vmscope lab build``: build (or find in the cache) the lab image and say
  where it is; CI runs this once to warm the cache.

Also ``python -m vmscope.lab ...``. ``main(argv)`` takes the arguments after
``lab``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmscope lab",
                                description="A Linux guest with real /dev/kvm under QEMU's emulator, "
                                "for hosts without VMX/SVM.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cpus", type=int, default=2, help="L1 vCPUs (default 2)")
    common.add_argument("--mem", type=int, default=2048, metavar="MIB", help="L1 memory (default 2048)")
    common.add_argument("--forward", type=int, action="append", default=[], metavar="PORT",
                        help="forward this L1 TCP port to a free host port; repeatable")
    common.add_argument("--ports", metavar="LOW-HIGH", help="host port range to pick from")
    common.add_argument("--with", dest="extra_dists", action="append", default=[],
                        metavar="DIST", help="also carry this installed Python distribution "
                        "(and its requirements) into L1, e.g. pytest; repeatable")
    common.add_argument("--put", action="append", default=[], metavar="HOST_PATH:L1_PATH",
                        help="carry a file or directory of this machine into L1 at L1_PATH "
                        "(your own kernel, initramfs, scripts); repeatable")
    common.add_argument("--arch", choices=("x86_64", "aarch64"), default=None,
                        help="L1 architecture (default: the host's); aarch64 needs "
                        "dpkg --add-architecture arm64 && apt-get update")
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", parents=[common], help="run a command in L1",
                         description="Boot L1, run CMD (a shell command line) there, stream its "
                         "output, and exit with its exit code.")
    run.add_argument("--timeout", type=float, default=None, help="seconds before CMD is killed")
    run.add_argument("--console", action="store_true", help="copy L1's console to stderr")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    sub.add_parser("shell", parents=[common], help="L1's console on this terminal")
    build = sub.add_parser("build", help="build or locate the lab image")
    build.add_argument("--arch", choices=("x86_64", "aarch64"), default=None)
    return p


def parse_puts(puts: list[str]) -> dict[str, str]:
    """``HOST_PATH:L1_PATH`` pairs -> ``{l1_path: host_path}`` (the
    :class:`~vmscope.lab.Lab` ``extra_files`` mapping); raises ValueError
    with a message for the user. The L1 path is what follows the last
    colon, and must be absolute."""
    files: dict[str, str] = {}
    for item in puts:
        host, sep, l1 = item.rpartition(":")
        if not sep or not host or not l1.startswith("/"):
            raise ValueError(f"--put {item!r}: give HOST_PATH:L1_PATH, the L1 path absolute")
        if not os.path.exists(host):
            raise ValueError(f"--put {item!r}: {host}: no such file or directory")
        files[l1] = os.path.abspath(host)
    return files


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from vmscope.images.debian import PackageError
    from vmscope.images.initramfs import InitramfsError
    from vmscope.images.kernel import KernelError
    from vmscope.lab.image import LabImageError, build_lab_image
    from vmscope.lab.lab import Lab, LabError, LabTimeout

    try:
        if args.action == "build":
            t0 = time.monotonic()
            from vmscope.lab.lab import _debian_arch
            image = build_lab_image(quiet=False, arch=_debian_arch(args.arch))
            print(f"kernel  {image.kernel.version} ({image.vmlinuz})")
            print(f"base    {image.base} ({image.base.stat().st_size / 2**20:.1f} MiB)")
            print(f"source  {image.source} ({image.source.stat().st_size / 2**10:.0f} KiB)")
            print(f"modules {' '.join(image.modules)}")
            print(f"took    {time.monotonic() - t0:.1f} s")
            return 0
        try:
            extra_files = parse_puts(args.put)
        except ValueError as exc:
            print(f"vmscope lab: {exc}", file=sys.stderr)
            return 2
        lab = Lab(cpus=args.cpus, mem_mib=args.mem, forward=args.forward, port_range=args.ports,
                  quiet=False, arch=args.arch, extra_dists=args.extra_dists, extra_files=extra_files or None,
                  console=(lambda line: print(f"[L1] {line}", file=sys.stderr, flush=True))
                  if getattr(args, "console", False) else None)
        if args.action == "shell":
            return lab.interactive()
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            print("vmscope lab run: give a command after --", file=sys.stderr)
            return 2
        with lab:
            for guest, host in ((g, lab.host_port(g)) for g in args.forward):
                print(f"L1 port {guest} is 127.0.0.1:{host} here", file=sys.stderr)

            def echo(stream: str, data: bytes) -> None:
                out = sys.stdout if stream == "stdout" else sys.stderr
                out.buffer.write(data)
                out.flush()

            command = cmd[0] if len(cmd) == 1 else " ".join(shlex.quote(c) for c in cmd)
            with lab.spawn(command, on_output=echo) as proc:
                proc.close_stdin()
                result = proc.wait(args.timeout)
            return result.returncode if result.returncode >= 0 else 128 - result.returncode
    except LabTimeout as exc:
        print(f"vmscope lab: {exc}", file=sys.stderr)
        return 124
    except (LabError, LabImageError, PackageError, KernelError, InitramfsError) as exc:
        print(f"vmscope lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
