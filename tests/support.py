"""Test support: run ``vmscope run`` as a user would and drive real debuggers.

- :class:`VmProcess`: ``python -m vmscope run ... --gdb 127.0.0.1:PORT`` in a
  subprocess, its serial output collected, waiting until the stub listens.
- :class:`Gdb`: an interactive ``gdb``/``gdb-multiarch`` on a pty (pexpect), so
  Ctrl-C is a real SIGINT to a real GDB.
- :func:`require_kvm`: skip when /dev/kvm is missing, unless
  VMSCOPE_REQUIRE_KVM=1 (CI on a KVM machine), where a missing KVM fails.
- :func:`elf_symbols`, :func:`elf_bytes_at`: what a guest ELF says, to compare
  what a debugger reads with; :func:`guest_ps`: a guest's busybox ``ps``.
- :class:`RawClient`: RSP requests one at a time, as GDB sends them (no ack).
- tests/kvm_support.py: the in-process KVM machine and synthetic guest images;
  tests/emu_support.py: the emulated-CPU target booted in-process.

Helpers shared by several test modules live here (or in another ``tests``
module that is not a test module), never in a ``test_*.py`` file: a test
module may move or change with its tests, and importing one runs its
module-level set-up (ports taken, files built) in the importer.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

try:  # absent from the arm64 lab's L1 Python, where only the register helpers run
    import pytest
except ImportError:
    pytest = None
from elftools.elf.elffile import ELFFile

from vmscope.childproc import die_with_parent

ROOT = Path(__file__).resolve().parent.parent


def require_kvm() -> None:
    ok = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    if not ok:
        if os.environ.get("VMSCOPE_REQUIRE_KVM") == "1":
            pytest.fail("VMSCOPE_REQUIRE_KVM=1 but /dev/kvm is not usable")
        pytest.skip("needs /dev/kvm")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (./dev.sh setup installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def elf_symbols(path) -> dict[str, int]:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        return {s.name: s["st_value"] for s in symtab.iter_symbols() if s.name}


def elf_bytes_at(path, addr: int, length: int) -> bytes:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]:
                off = addr - seg["p_vaddr"]
                return seg.data()[off : off + length]
    raise AssertionError(f"{addr:#x} not in a loaded segment")


def guest_ps(text: str) -> dict[int, tuple[int, str]]:
    """busybox ``ps`` output -> {pid: (ppid, comm)}."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(\S.*)$", line)
        if m:
            rows[int(m.group(1))] = (int(m.group(2)), m.group(3).strip())
    return rows


class VmProcess:
    """``vmscope run`` in a subprocess."""

    def __init__(self, *args: str, gdb_port: int | None = None, env: dict | None = None) -> None:
        self.port = gdb_port
        cmd = [sys.executable, "-m", "vmscope", "run", *args]
        if gdb_port is not None:
            cmd += ["--gdb", f"127.0.0.1:{gdb_port}"]
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT, env={**os.environ, **(env or {})},
            preexec_fn=die_with_parent,  # a killed test run leaves no VMM spinning
        )
        self.output = bytearray()
        self.errors = bytearray()
        self._lock = threading.Lock()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.output), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.errors), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _pump(self, stream, sink: bytearray) -> None:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(1)
            if not chunk:
                return
            with self._lock:
                sink += chunk

    @property
    def serial(self) -> str:
        with self._lock:
            return self.output.decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._lock:
            return self.errors.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60, stream: str = "serial") -> re.Match:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            text = self.serial if stream == "serial" else self.stderr
            m = rx.search(text)
            if m:
                return m
            if self.proc.poll() is not None:
                time.sleep(0.2)
                text = self.serial if stream == "serial" else self.stderr
                if rx.search(text):
                    return rx.search(text)
                raise AssertionError(
                    f"vmscope exited ({self.proc.returncode}) before {pattern!r}\n"
                    f"serial: {self.serial[-2000:]}\nstderr: {self.stderr[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {pattern!r}\nserial: {self.serial[-2000:]}\nstderr: {self.stderr[-3000:]}"
                )
            time.sleep(0.05)

    def wait_listening(self, timeout: float = 60) -> None:
        self.wait_for(r"waiting for gdb", timeout, stream="stderr")

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Gdb:
    """An interactive GDB on a pty, driven command by command."""

    PROMPT = r"\(gdb\) $"

    def __init__(self, elf: Path | None, *, binary: str = "gdb", timeout: float = 60) -> None:
        import pexpect  # here, not at the top: the nested lab imports this module and has no pexpect

        exe = require_tool(binary)
        args = ["-q", "-nx", "-iex", "set pagination off", "-iex", "set confirm off", "-iex", "set width 0",
                "-iex", "set style enabled off"]
        if elf is not None:
            args.append(str(elf))
        self.child = pexpect.spawn(exe, args, encoding="utf-8", codec_errors="replace", timeout=timeout,
                                   dimensions=(200, 250), env={**os.environ, "TERM": "dumb"})
        self.log: list[str] = []
        self.child.expect(self.PROMPT)

    def cmd(self, command: str, timeout: float | None = None) -> str:
        self.child.sendline(command)
        self.child.expect(self.PROMPT, timeout=timeout if timeout is not None else self.child.timeout)
        out = self.child.before
        # drop the echoed command line
        out = out.split("\n", 1)[1] if "\n" in out else ""
        out = out.replace("\r", "")
        self.log.append(f"(gdb) {command}\n{out}")
        return out

    def start(self, command: str) -> None:
        """Send a command that keeps running (continue) without waiting."""
        self.child.sendline(command)
        self.log.append(f"(gdb) {command}  [running]")

    def interrupt(self, timeout: float = 30) -> str:
        self.child.sendintr()
        self.child.expect(self.PROMPT, timeout=timeout)
        out = self.child.before.replace("\r", "")
        self.log.append(f"^C\n{out}")
        return out

    def wait_prompt(self, timeout: float = 60) -> str:
        self.child.expect(self.PROMPT, timeout=timeout)
        out = self.child.before.replace("\r", "")
        self.log.append(out)
        return out

    def value(self, expr: str) -> int:
        out = self.cmd(f"print/x {expr}")
        m = re.search(r"= (0x[0-9a-f]+)", out)
        if not m:
            raise AssertionError(f"cannot read {expr}: {out!r}")
        return int(m.group(1), 16)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)

    def transcript(self) -> str:
        return "\n".join(self.log[-40:])


# --- register round trips -------------------------------------------------------------

#: Values each register can hold on every back end, from the state at a
#: demo guest's entry (``cur``): control bits that change nothing the write
#: itself could break (x86 TSD, WP, SCE; arm64 NZCV, EPD0, I), exception
#: flags rather than the x87 stack top, aligned addresses.
_REGISTER_TEST_VALUES = {
    "eflags": lambda cur: cur ^ 0xC5,  # CF PF ZF SF
    "cs": lambda cur: cur, "ss": lambda cur: cur,  # the code/stack descriptors must stay loadable
    "ds": lambda cur: 0, "es": lambda cur: 0, "fs": lambda cur: 0, "gs": lambda cur: 0,  # the null selector
    "cr0": lambda cur: cur ^ (1 << 16),  # WP
    "cr2": lambda cur: 0x1234_5000,
    "cr3": lambda cur: cur ^ 0x1000,
    "cr4": lambda cur: cur ^ (1 << 2),  # TSD
    "cr8": lambda cur: cur ^ 0x5,
    "efer": lambda cur: cur ^ 1,  # SCE
    "fs_base": lambda cur: 0x7FFF_1234_5000, "gs_base": lambda cur: 0x7FFF_2345_6000,
    "k_gs_base": lambda cur: 0xFFFF_8880_1234_5000,
    "fctrl": lambda cur: cur ^ 0x0C00,  # rounding control
    "fstat": lambda cur: cur ^ 0x1,  # invalid-operation flag (masked), not TOP
    "ftag": lambda cur: 0xFFFC if cur != 0xFFFC else 0xFFF3,
    "fop": lambda cur: 0x123, "fioff": lambda cur: 0x1234_5678, "fooff": lambda cur: 0x2345_6789,
    "fiseg": lambda cur: 0x23, "foseg": lambda cur: 0x2B,
    "mxcsr": lambda cur: cur ^ 0x6000,  # rounding control
    "cpsr": lambda cur: cur ^ 0xF000_0000,  # NZCV
    "fpsr": lambda cur: cur ^ 0x1,  # IOC
    "fpcr": lambda cur: cur ^ (1 << 24),  # FZ
    "SCTLR_EL1": lambda cur: cur ^ (1 << 12),  # I
    "TCR_EL1": lambda cur: cur ^ (1 << 7),  # EPD0
    "VBAR_EL1": lambda cur: 0x4000_0800,
    "ESR_EL1": lambda cur: 0x5600_0001,
    "SPSR_EL1": lambda cur: 0x6000_03C5,
    "MPIDR_EL1": lambda cur: cur, "CurrentEL": lambda cur: cur,  # read-only in the architecture
}


def register_test_value(name: str, bitsize: int, cur: int, n: int) -> int:
    """A value for register ``name`` (number ``n``) other than ``cur``, that
    every back end can hold (or ``cur`` where the architecture makes the
    register read-only)."""
    special = _REGISTER_TEST_VALUES.get(name)
    if special is not None:
        return special(cur)
    if re.fullmatch(r"st\d", name):
        return 0x4000_8000_0000_0000_0000 | n  # a normal 80-bit value (explicit integer bit)
    pattern = int.from_bytes(bytes((n * 7 + i * 13) & 0xFF for i in range(bitsize // 8)), "little")
    return pattern & ~0xF if name in ("sp", "pc", "rsp", "SP_EL0", "SP_EL1", "ELR_EL1") else pattern


def _x87_empty(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 == 3)


#: registers whose read-back is the written value only in part, by architecture:
#: the x87 tag word's finer tags (valid/zero/special) follow the registers'
#: contents (FXSAVE keeps only empty/full), so which registers are empty is
#: what must round-trip
_SAME = {"ftag": lambda a, b: _x87_empty(a) == _x87_empty(b)}


def register_round_trip(target, tid: int, skip: frozenset = frozenset()) -> tuple[list[str], dict[str, str]]:
    """Write every register of ``target``'s architecture one at a time,
    read it back, put the old value back. Returns the registers whose value
    read back as written, and the refusals (name -> error text). A write
    that is accepted but reads back otherwise fails at once."""
    from vmscope.gdbserver.target import TargetError

    arch = target.arch
    took, refused = [], {}
    for n, reg in enumerate(arch.registers):
        if reg.name in skip:
            continue
        old = target.read_registers(tid)[reg.name]
        new = register_test_value(reg.name, reg.bitsize, old, n)
        try:
            target.write_registers(tid, {reg.name: new})
        except TargetError as e:
            refused[reg.name] = str(e)
            assert target.read_registers(tid)[reg.name] == old, f"{reg.name}: a refused write changed it"
            continue
        same = _SAME.get(reg.name, int.__eq__)
        got = target.read_registers(tid)[reg.name]
        assert same(got, new), f"{reg.name}: wrote {new:#x}, read {got:#x}"
        target.write_registers(tid, {reg.name: old})
        got = target.read_registers(tid)[reg.name]
        assert same(got, old), f"{reg.name}: wrote the old value {old:#x} back, read {got:#x}"
        took.append(reg.name)
    return took, refused


def x86_with_an_msr_line():
    """X86_64's table plus one line, IA32_STAR (0xC0000081): what adding an
    MSR register to vmscope takes."""
    import dataclasses

    from vmscope.arch.registers import Register
    from vmscope.arch.x86_64 import SYSTEM, X86_64

    return dataclasses.replace(X86_64, registers=X86_64.registers + (Register("star", 64, SYSTEM, msr=0xC000_0081),))


class RawClient:
    """RSP requests one at a time, as GDB sends them, in no-ack mode."""

    def __init__(self, port: int) -> None:
        from vmscope.rsp.framing import Endpoint

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.ep = Endpoint()
        self.ask(b"QStartNoAckMode")
        self.ep.disable_acks()

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.ask_nothing()

    def interrupt(self) -> bytes:
        """Ctrl-C (0x03) to a running target: the stop reply."""
        self.sock.sendall(b"\x03")
        return self.ask_nothing()

    def ask_nothing(self) -> bytes:
        """The next packet the stub sends, sending nothing."""
        from vmscope.rsp.framing import Packet

        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the stub closed the connection")
            for ev in self.ep.receive(chunk):
                if isinstance(ev, Packet):
                    return ev.payload

    def send(self, payload: bytes) -> None:
        """A request whose reply comes later (a continue)."""
        self.ep.send(payload)
        self.sock.sendall(self.ep.data_to_send())

    def close(self) -> None:
        self.sock.close()
