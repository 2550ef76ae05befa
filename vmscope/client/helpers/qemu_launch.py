"""Start QEMU the way introspection likes it: a GDB stub, QMP, guest RAM
in a shared file (so it can be mapped), and the serial console on a Unix
socket that :class:`SerialConsole` drives. Used by the benchmarks and the
end-to-end tests; handy from a Python prompt too."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field


class SerialConsole:
    """A guest shell on a serial Unix socket: :meth:`run` a command, get its output."""

    def __init__(self, path: str, connect_timeout: float = 30, alive=lambda: True):
        deadline = time.monotonic() + connect_timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline or not alive():
                    raise
                time.sleep(0.1)
        self.buf = bytearray()
        self.cond = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            with self.cond:
                self.buf += data if data else b"\n<serial closed>"
                self.cond.notify_all()
                if not data:
                    return

    def wait_for(self, text: bytes, start: int = 0, timeout: float = 240) -> int:
        deadline = time.monotonic() + timeout
        with self.cond:
            while (pos := self.buf.find(text, start)) < 0:
                left = deadline - time.monotonic()
                if left <= 0 or b"<serial closed>" in self.buf[start:]:
                    raise TimeoutError(f"guest never printed {text!r}; console tail:\n"
                                       f"{self.buf[-2000:].decode(errors='replace')}")
                self.cond.wait(min(left, 1))
            return pos

    def run(self, command: str, timeout: float = 120) -> str:
        """Run ``command`` in the guest's shell and return what it printed."""
        tag = uuid.uuid4().hex[:8]
        with self.cond:
            start = len(self.buf)
        # $((1)) keeps the echoed command line itself from matching the markers.
        self.sock.sendall(f"echo B{tag}$((1)); {command}; echo E{tag}$((1))\n".encode())
        begin = self.wait_for(f"B{tag}1".encode(), start, timeout)
        end = self.wait_for(f"E{tag}1".encode(), begin, timeout)
        return self.buf[begin + len(tag) + 2 : end].decode(errors="replace").replace("\r", "")

    def close(self) -> None:
        self.sock.close()


@dataclass
class QemuGuest:
    """A running ``qemu-system-x86_64 -accel tcg`` guest; use as a context manager."""

    kernel: str
    initrd: str | None
    gdb_port: int
    qmp_port: int
    memory_mib: int = 512
    cmdline: str = "console=ttyS0 panic=-1"
    qemu: str = "qemu-system-x86_64"
    machine: str = "pc"
    #: "file" (a file in /dev/shm) or "memfd" (memory-backend-memfd): both shared, both mappable
    ram_backend: str = "file"
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    console: SerialConsole | None = None

    def start(self) -> "QemuGuest":
        self._dir = tempfile.mkdtemp(prefix="vmscope-qemu-")
        self.ram_path = f"/dev/shm/vmscope-ram-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        serial = os.path.join(self._dir, "serial.sock")
        argv = [self.qemu, "-accel", "tcg", "-m", str(self.memory_mib), "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot",
                "-object", self._backend(),
                "-machine", f"{self.machine},memory-backend=mem",
                "-chardev", f"socket,id=s0,path={serial},server=on,wait=off", "-serial", "chardev:s0",
                "-gdb", f"tcp:127.0.0.1:{self.gdb_port}",
                "-qmp", f"tcp:127.0.0.1:{self.qmp_port},server=on,wait=off",
                "-kernel", self.kernel, "-append", self.cmdline, *self.extra]
        if self.initrd:
            argv += ["-initrd", self.initrd]
        self.log_path = os.path.join(self._dir, "qemu.log")
        with open(self.log_path, "wb") as log:  # a file, not a pipe nobody drains
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.console = SerialConsole(serial, alive=lambda: self.proc.poll() is None)
            self._wait_listening()
        except OSError as e:
            log_text = self.log()
            self.stop()
            raise RuntimeError(f"{self.qemu} did not start ({e}); its output:\n{log_text}") from e
        return self

    def _wait_listening(self, timeout: float = 30) -> None:
        """QEMU opens the serial chardev before its gdbstub and QMP listen:
        wait until both ports do (read from /proc/net/tcp, since a probing
        connection would itself stop the guest)."""
        from vmscope.client.helpers.qemu import _listening_inode

        deadline = time.monotonic() + timeout
        while any(_listening_inode(address) is None for address in (self.gdb, self.qmp)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"the gdbstub ({self.gdb}) and QMP ({self.qmp}) are not both listening")
            time.sleep(0.05)

    def log(self) -> str:
        """What QEMU itself printed (errors about its command line, warnings)."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    def _backend(self) -> str:
        if self.ram_backend == "memfd":
            return f"memory-backend-memfd,id=mem,size={self.memory_mib}M,share=on"
        if self.ram_backend == "file":
            return f"memory-backend-file,id=mem,size={self.memory_mib}M,mem-path={self.ram_path},share=on"
        raise ValueError(f"ram_backend must be 'file' or 'memfd', not {self.ram_backend!r}")

    @property
    def gdb(self) -> str:
        return f"127.0.0.1:{self.gdb_port}"

    @property
    def qmp(self) -> str:
        return f"127.0.0.1:{self.qmp_port}"

    def stop(self) -> None:
        if self.console:
            self.console.close()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait(timeout=30)
        if os.path.exists(getattr(self, "ram_path", "")):
            os.unlink(self.ram_path)
        import shutil

        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)

    def __enter__(self) -> "QemuGuest":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
