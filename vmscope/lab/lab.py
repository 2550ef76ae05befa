"""A nested KVM lab: Linux with a real ``/dev/kvm``, inside QEMU's emulator.

Hosts without VMX/SVM (this project's CI among them) cannot run a KVM guest
directly, but ``qemu-system-x86_64 -accel tcg -cpu max`` emulates AMD SVM
with nested paging. :class:`Lab` boots Debian's cloud kernel there ("L1")
with ``kvm-amd`` loaded and a command agent listening, then runs commands in
it. Code under test runs in L1 against real KVM; its own guests are "L2".

One :class:`Lab` is meant to be booted once and reused for many commands:
booting costs seconds, a command round trip costs milliseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from vmscope.childproc import die_with_parent
from vmscope.images.cache import cache_dir
from vmscope.lab.image import (AGENT_PORT, KVM_MARKER, READY_MARKER, RUNTIME_DISTS, LabImage,
                               build_lab_image)
from vmscope.lab.process import LabError, LabProcess, LabResult, LabTimeout

PORT_RANGE_ENV = "VMSCOPE_LAB_PORTS"  # e.g. "14000-14999"


@dataclasses.dataclass(frozen=True)
class _Machine:
    """How QEMU emulates a CPU that has hardware virtualization."""

    qemu: str
    args: tuple[str, ...]
    console: str


MACHINES = {
    # -cpu max under TCG is an AMD CPU with SVM and nested paging.
    "amd64": _Machine("qemu-system-x86_64", (), "ttyS0"),
    # virtualization=on starts the kernel at EL2, so KVM (built in) comes up.
    "arm64": _Machine("qemu-system-aarch64", ("-machine", "virt,virtualization=on,gic-version=3"),
                      "ttyAMA0"),
}
_ARCH_ALIASES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def _debian_arch(arch: str | None) -> str:
    if arch is None:
        from vmscope.images.debian import host_arch
        return host_arch()
    try:
        return _ARCH_ALIASES[arch]
    except KeyError:
        raise LabError(f"no lab for architecture {arch!r}; choose x86_64 or aarch64") from None


def parse_port_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m or not (0 < int(m.group(1)) <= int(m.group(2)) < 65536):
        raise LabError(f"bad port range {text!r}; expected LOW-HIGH, e.g. 14000-14999")
    return int(m.group(1)), int(m.group(2))


def free_ports(count: int, port_range: tuple[int, int] | None = None,
               avoid: Iterable[int] = ()) -> list[int]:
    """``count`` TCP ports on 127.0.0.1 that nobody listens on right now.

    Within ``port_range`` if given (tests run side by side with fixed ranges),
    else whatever the kernel hands out.
    """
    ports: list[int] = []
    avoid = set(avoid)
    if port_range is None:
        for _ in range(count):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        return ports
    low, high = port_range
    for port in range(low, high + 1):
        if port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise LabError(f"no {count} free TCP ports in {low}-{high}")


LAB_DIED = "the lab itself died"
"""Said in an error when L1's QEMU ended under a command: a kernel panic in
L1 or an emulator crash, not anything the command did to its own guest."""

LAB_WEDGED = "the lab stopped starting commands"
"""Said in an error when L1's QEMU still runs but the lab's agent no longer
starts a command (within :data:`AGENT_START_SECONDS`): L1 is wedged, as the
lab has been under interrupt-heavy L2 guests whatever the VMM
(docs/kvm-notes.md). Like :data:`LAB_DIED`, it is the lab's failure, not
the command's; a wedged lab is never given another command."""

AGENT_START_SECONDS = 60
"""How long the agent may take to start a command in a slow (TCG) L1."""


class Lab:
    """An L1 guest with real KVM, booted under QEMU's TCG emulator.

    ``forward`` lists guest TCP ports to reach from the host; the host side
    is :meth:`host_port`. ``console`` receives each console line as it
    arrives (the whole console is also kept in :attr:`console_log`, a file).
    ``port_range`` (or ``$VMSCOPE_LAB_PORTS``) bounds the host ports used.
    ``extra_dists`` names more installed Python distributions to carry (e.g.
    ``["pytest"]`` to run test files inside L1); ``extra_files`` maps L1
    paths to host files, directories or bytes.
    """

    def __init__(self, cpus: int = 2, mem_mib: int = 2048, forward: Sequence[int] = (),
                 console: Callable[[str], None] | None = None,
                 port_range: tuple[int, int] | str | None = None,
                 boot_timeout: float = 600, image: LabImage | None = None,
                 extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
                 cmdline: str | None = None, qemu: str | None = None,
                 quiet: bool = True, arch: str | None = None,
                 extra_dists: Sequence[str] = ()) -> None:
        if cpus < 1 or mem_mib < 256:
            raise LabError("the lab needs at least 1 CPU and 256 MiB")
        self.arch = _debian_arch(arch)
        self.machine = MACHINES[self.arch]
        self.cpus, self.mem_mib = cpus, mem_mib
        self.forward = [int(p) for p in forward]
        if AGENT_PORT in self.forward:
            raise LabError(f"guest port {AGENT_PORT} is the lab agent's; forward another port")
        self._console_cb = console
        if isinstance(port_range, str):
            port_range = parse_port_range(port_range)
        if port_range is None and os.environ.get(PORT_RANGE_ENV):
            port_range = parse_port_range(os.environ[PORT_RANGE_ENV])
        self.port_range = port_range
        self.boot_timeout = boot_timeout
        self._image = image
        self._extra_files = extra_files
        self._extra_dists = tuple(extra_dists)
        self.cmdline = cmdline or f"console={self.machine.console} panic=-1 quiet"
        self.qemu = qemu or self.machine.qemu
        self.quiet = quiet
        self._proc: subprocess.Popen | None = None
        self._ports: dict[int, int] = {}
        self._lines: list[str] = []
        self._lines_changed = threading.Condition()
        self._workdir: Path | None = None
        self._console_thread = threading.Thread()
        self.console_log: Path | None = None
        self.kvm_available: bool | None = None
        self.timings: dict[str, float] = {}
        self._wedged = False

    # -- life cycle -----------------------------------------------------------
    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self._proc is not None:
            raise LabError("this lab is already started")
        if not shutil.which(self.qemu):
            raise LabError(f"{self.qemu} is not installed (apt-get install qemu-system-x86)")
        t0 = time.monotonic()
        image = self._image or self._build_image()
        self.image = image
        self.timings["image_s"] = time.monotonic() - t0
        self._workdir = _new_run_dir()
        initrd = image.combined(self._workdir / "initrd.cpio")
        self.console_log = self._workdir / "console.log"
        guest_ports = [AGENT_PORT, *self.forward]
        host_ports = free_ports(len(guest_ports), self.port_range)
        self._ports = dict(zip(guest_ports, host_ports))
        argv = self.qemu_argv(image, initrd)
        self.argv = argv
        t1 = time.monotonic()
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=die_with_parent)  # a killed test run leaves no emulator behind
        self._console_thread = threading.Thread(target=self._read_console, name="lab-console",
                                                daemon=True)
        self._console_thread.start()
        try:
            self.wait_for_console(re.escape(READY_MARKER), self.boot_timeout)
        except LabError as exc:
            self.close()
            raise LabError(f"the lab did not boot: {exc}") from None
        except BaseException:  # Ctrl-C while booting: __exit__ will not run
            self.close()
            raise
        self.timings["boot_s"] = time.monotonic() - t1
        self.kvm_available = any(l.startswith(f"{KVM_MARKER} yes") for l in self._lines)

    def _build_image(self) -> LabImage:
        return build_lab_image(extra_files=self._extra_files, quiet=self.quiet, arch=self.arch,
                               dists=(*RUNTIME_DISTS, *self._extra_dists))

    def qemu_argv(self, image: LabImage, initrd: Path, serial: str = "stdio") -> list[str]:
        """The QEMU command line: TCG with ``-cpu max`` (AMD SVM + nested
        paging), virtio-net on user networking with the host forwards."""
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in self._ports.items())
        return [self.qemu, *self.machine.args, "-accel", "tcg,thread=multi", "-cpu", "max",
                "-smp", str(self.cpus), "-m", str(self.mem_mib),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", serial, "-kernel", str(image.vmlinuz), "-initrd", str(initrd),
                "-append", self.cmdline,
                "-netdev", f"user,id=n0{',' if fwd else ''}{fwd}",
                "-device", "virtio-net-pci,netdev=n0"]

    def interactive(self) -> int:
        """Boot L1 with the console on this terminal (``vmscope lab shell``).
        Returns QEMU's exit status; Ctrl-A X quits."""
        if not shutil.which(self.qemu):
            raise LabError(f"{self.qemu} is not installed (apt-get install qemu-system-x86)")
        image = self._image or self._build_image()
        self._workdir = _new_run_dir()
        initrd = image.combined(self._workdir / "initrd.cpio")
        guest_ports = [AGENT_PORT, *self.forward]
        self._ports = dict(zip(guest_ports, free_ports(len(guest_ports), self.port_range)))
        try:
            return subprocess.call(self.qemu_argv(image, initrd, serial="mon:stdio"))
        finally:
            initrd.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop QEMU (nothing in L1 needs saving) and remove the run files."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None and proc.stdin:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._workdir is not None:
            initrd = self._workdir / "initrd.cpio"
            initrd.unlink(missing_ok=True)  # large; the console log stays for post-mortems

    # -- console --------------------------------------------------------------
    def _read_console(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None and self.console_log is not None
        with open(self.console_log, "wb") as log:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip("\r\n")
                with self._lines_changed:
                    self._lines.append(line)
                    self._lines_changed.notify_all()
                if self._console_cb:
                    with contextlib.suppress(Exception):
                        self._console_cb(line)
        with self._lines_changed:
            self._lines_changed.notify_all()

    @property
    def console(self) -> str:
        """Everything L1 printed on its serial console so far."""
        with self._lines_changed:
            return "\n".join(self._lines)

    def wait_for_console(self, pattern: str, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._lines_changed:
            while True:
                for line in self._lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self._lines)
                proc = self._proc
                if proc is None or proc.poll() is not None:
                    if self._console_thread.is_alive():
                        # QEMU is gone but its last lines may still be in the
                        # pipe: let the reader drain them, then look again
                        self._lines_changed.wait(0.2)
                        continue
                    if any(rx.search(line) for line in self._lines[seen:]):
                        continue
                    code = None if proc is None else proc.returncode
                    raise LabError(f"QEMU exited ({code}) before {pattern!r} appeared; "
                                   f"console:\n{self._tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabTimeout(f"{pattern!r} did not appear on the console within "
                                     f"{timeout} s; console:\n{self._tail()}")
                self._lines_changed.wait(min(left, 0.5))

    @property
    def running(self) -> bool:
        """Whether L1 (its QEMU) is still up."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def usable(self) -> bool:
        """Whether L1 is up and its agent last started what it was asked
        to: false for a dead lab and for a wedged one (:data:`LAB_WEDGED`)."""
        return self.running and not self._wedged

    def still_answers(self) -> str:
        """Empty when the agent still starts a command (``true``); else
        :data:`LAB_WEDGED` or :data:`LAB_DIED` with L1's account, for the
        error of a command that timed out: a test waiting on its guest
        cannot tell a slow guest from a lab that stopped running anything."""
        try:
            with self.spawn(["true"], check_lab=False) as probe:  # a probe that times out must not probe again
                probe.wait(AGENT_START_SECONDS)
        except LabError as exc:
            return f"; {exc}"
        return ""

    def post_mortem(self, wait: float = 5) -> str:
        """How L1 stands, for an error message: whether QEMU still runs (its
        exit status if not, with :data:`LAB_DIED`) and the console's last
        lines, where a panic, an OOM kill or a KVM splat would show. Empty
        when QEMU was never started."""
        proc = self._proc
        if proc is None:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)  # a dropped agent connection usually means L1 is going down
        if proc.poll() is not None and self._console_thread.is_alive():
            self._console_thread.join(2)  # let the last console lines in
        state = (f"{LAB_DIED}: QEMU exited with status {proc.returncode}" if proc.poll() is not None
                 else "QEMU still runs")
        where = f" (whole console: {self.console_log})" if self.console_log else ""
        return f"; {state}; L1 console, last lines{where}:\n{self._tail()}"

    def _tail(self, n: int = 40) -> str:
        return "\n".join(self._lines[-n:])

    # -- commands ---------------------------------------------------------------
    def host_port(self, guest_port: int) -> int:
        """The 127.0.0.1 port on the host that reaches ``guest_port`` in L1."""
        try:
            return self._ports[guest_port]
        except KeyError:
            raise LabError(f"guest port {guest_port} is not forwarded; pass forward=[{guest_port}]") from None

    def spawn(self, cmd: str | Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None,
              on_output: Callable[[str, bytes], None] | None = None, check_lab: bool = True) -> LabProcess:
        """Start ``cmd`` in L1 (a shell command line, or an argv list) and
        return at once. Use as a context manager to kill it on exit.
        ``check_lab``: a timeout waiting on it asks whether the lab still
        starts commands (:meth:`still_answers`)."""
        if self._proc is None or self._proc.poll() is not None:
            raise LabError(f"the lab is not running{self.post_mortem()}")
        if self._wedged:
            raise LabError(f"{LAB_WEDGED} before {cmd!r}{self.post_mortem(wait=0)}")
        cmd = cmd if isinstance(cmd, str) else list(cmd)
        try:
            sock = socket.create_connection(("127.0.0.1", self._ports[AGENT_PORT]), timeout=30)
        except OSError as exc:
            raise LabError(f"cannot reach the lab agent: {exc}") from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(json.dumps({"cmd": cmd, "env": dict(env or {}), "cwd": cwd}).encode() + b"\n")
        proc = LabProcess(sock, cmd, on_output, post_mortem=self.post_mortem,
                          lab_check=self.still_answers if check_lab else None)
        if not proc._started.wait(AGENT_START_SECONDS):
            proc.__exit__()
            self._wedged = self.running
            raise LabError(f"{LAB_WEDGED if self._wedged else 'the lab agent failed'}: "
                           f"its agent did not start {cmd!r} in {AGENT_START_SECONDS} s"
                           f"{self.post_mortem(wait=0)}")
        return proc

    def run(self, cmd: str | Sequence[str], timeout: float | None = 600,
            env: Mapping[str, str] | None = None, cwd: str | None = None,
            input: str | None = None, check: bool = False) -> LabResult:
        """Run ``cmd`` in L1 to completion and return its exit code and output."""
        with self.spawn(cmd, env=env, cwd=cwd) as proc:
            if input is not None:
                proc.write(input)
            proc.close_stdin()
            result = proc.wait(timeout)
        return result.check() if check else result

    def put(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file in L1 after boot (for files known only at test time;
        ``extra_files=`` is the way for files known before boot)."""
        import base64

        raw = data.encode() if isinstance(data, str) else data
        code = ("import base64, os, sys; p = sys.argv[1]; "
                "os.makedirs(os.path.dirname(p) or '.', exist_ok=True); "
                "open(p, 'wb').write(base64.b64decode(sys.stdin.read())); os.chmod(p, int(sys.argv[2]))")
        self.run(["python3", "-c", code, path, str(mode)], input=base64.b64encode(raw).decode(),
                 check=True)

    def get(self, path: str) -> bytes:
        """Read a file from L1."""
        import base64

        r = self.run(["python3", "-c", "import base64, sys; "
                      "sys.stdout.write(base64.b64encode(open(sys.argv[1], 'rb').read()).decode())", path])
        if r.returncode != 0:
            raise LabError(f"cannot read {path} in the lab: {r.stderr.strip().splitlines()[-1:]}")
        return base64.b64decode(r.stdout)

    def python(self, code: str, timeout: float | None = 600, check: bool = False) -> LabResult:
        """Run a Python snippet with L1's python3 (vmscope importable)."""
        return self.run(["python3", "-c", code], timeout=timeout, check=check)


def _new_run_dir(keep: int = 20) -> Path:
    """A fresh directory for one lab's initrd and console log; the oldest
    ones beyond ``keep`` are removed (console logs are for post-mortems)."""
    root = cache_dir("lab")
    runs = sorted(root.glob("run-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in runs[keep - 1:]:
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=root))
