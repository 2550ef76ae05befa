"""``vmscope lab``: the nested KVM lab from the command line.

- ``vmscope lab run [options] -- CMD...``: boot L1, run CMD there, stream its
  output, exit with its exit code.
- ``vmscope lab shell``: boot L1 with its console on this terminal (Ctrl-A X
  quits).
- ``vmscope lab build``: build (or find in the cache) the lab image and say
  where it is; CI runs this once to warm the cache.

Also ``python -m vmscope.lab ...``. ``main(argv)`` takes the arguments after
``lab``.
"""

from __future__ import annotations

import argparse
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
        lab = Lab(cpus=args.cpus, mem_mib=args.mem, forward=args.forward, port_range=args.ports,
                  quiet=False, arch=args.arch, extra_dists=args.extra_dists,
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
