"""The client leaves QEMU's gdbstub as it found it, whatever happens.

Issue 12's three bugs, each against a real ``qemu-system-x86_64 -accel tcg``
running the demo guest (shared RAM, so the test can watch ``counter`` move
without attaching anything), each checked afterwards by what a user sees:
a new debugger attaches at once, a stock gdb reads the right bytes, the
guest keeps running.

- A failing ``Inspector(...)`` constructor must close the connection it had
  already opened (QEMU serves one debugger at a time and stays paused).
- Closing an Inspector while the guest runs (``cont`` timed out, or Ctrl-C
  inside it) must stop the guest before it sets QEMU's memory mode back to
  virtual: QEMU takes a packet to a running guest as a stop request and
  drops it, and the next gdb then reads physical memory at virtual addresses.
- A request while the guest runs must raise :class:`TargetRunning`, not
  parse the stop reply as the answer.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.support import elf_bytes_at, elf_symbols, free_port, require_tool
from vmscope.client import Client, NotAGdbStub, StubBusy, StubTimeout, TargetRunning
from vmscope.client.helpers.qemu import QmpError
from vmscope.client.helpers.qemu_launch import QemuGuest
from vmscope.client.session import Inspector
from vmscope.guests import guest_elf

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ELF = guest_elf("demo", "x86_64")
SYMBOLS = elf_symbols(ELF)
#: The demo guest maps its first GiB 1:1; the test adds this alias (PML4
#: slot 256 -> the same page directory pointer table), so the guest has a
#: virtual address that is not its physical one, as a kernel's are.
HIGH = 0xFFFF_8000_0000_0000


@pytest.fixture
def demo():
    require_tool("qemu-system-x86_64")
    with QemuGuest(str(ELF), None, free_port(), free_port(), memory_mib=64, cmdline="") as vm:
        vm.console.wait_for(b"vmscope demo guest: heartbeat", timeout=60)  # the banner may pass before we connect
        yield vm


def counter(vm: QemuGuest) -> int:
    """The guest's ``counter``, read from QEMU's shared RAM file (below
    4 GiB the file offset is the physical address)."""
    with open(vm.ram_path, "rb") as f:
        f.seek(SYMBOLS["counter"])
        return int.from_bytes(f.read(8), "little")


def assert_running(vm: QemuGuest) -> None:
    first = counter(vm)
    deadline = time.monotonic() + 5
    while counter(vm) == first:
        assert time.monotonic() < deadline, "the guest was left stopped: counter does not move"
        time.sleep(0.05)


def assert_attaches_at_once(vm: QemuGuest) -> None:
    """A new debugger gets the stub: its handshake is answered in time."""
    started = time.monotonic()
    with Client.connect(vm.gdb, timeout=5) as c:
        assert c.last_stop.kind == "signal"
        c.detach()
    assert time.monotonic() - started < 5


def stock_gdb_read(vm: QemuGuest, addr: int, length: int) -> bytes:
    """Bytes at a virtual address as a stock gdb (batch mode) reads them."""
    out = subprocess.run(
        [require_tool("gdb"), "-nx", "-batch", "-ex", "set confirm off", "-ex", f"target remote {vm.gdb}",
         "-ex", f"x/{length}xb {addr:#x}", "-ex", "detach"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    values = re.findall(r"\t0x([0-9a-f]{2})", out.stdout)
    assert len(values) == length, f"gdb did not read {length} bytes:\n{out.stdout}\n{out.stderr}"
    return bytes(int(v, 16) for v in values)


def test_failed_constructor_closes_the_stub_connection(demo):
    wrong_qmp = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(QmpError) as failure:
        Inspector(gdb=demo.gdb, qmp=wrong_qmp, timeout=5)
    assert wrong_qmp in str(failure.value)
    assert_running(demo)
    assert_attaches_at_once(demo)


def _alias_high_half(vm: QemuGuest) -> None:
    with Client.connect(vm.gdb, timeout=10) as c:
        pml4 = SYMBOLS["pml4"]
        c.write_memory(pml4 + 256 * 8, c.read_memory(pml4, 8))
        c.detach()


def _ctrl_c_soon() -> None:
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()


@pytest.mark.parametrize("ending", ["cont-timeout", "ctrl-c"])
def test_closing_while_running_restores_virtual_addressing(demo, ending):
    _alias_high_half(demo)
    tick = SYMBOLS["tick"]
    expected = elf_bytes_at(ELF, tick, 16)
    assert stock_gdb_read(demo, HIGH + tick, 16) == expected  # the alias works before we start

    vm = Inspector(gdb=demo.gdb, memory="rsp", timeout=5)
    assert vm.phys.read(tick, 16) == expected  # QEMU is now in physical-memory mode
    vm.client.set_breakpoint(SYMBOLS["pvh_entry"], hardware=True)  # never hit again: must be removed
    if ending == "cont-timeout":
        with pytest.raises(StubTimeout):
            vm.client.cont(timeout=0.5)
    else:
        _ctrl_c_soon()
        with pytest.raises(KeyboardInterrupt):
            vm.client.cont()
    assert vm.client.running
    vm.close()

    assert_running(demo)
    assert stock_gdb_read(demo, HIGH + tick, 16) == expected  # virtual addressing again, not zeros


def test_requests_while_running_raise_target_running(demo):
    with Client.connect(demo.gdb, timeout=10) as c:
        c.resume()
        with pytest.raises(TargetRunning, match="running; stop it first"):
            c.registers()
        for call in (lambda: c.read_memory(SYMBOLS["counter"], 8), c.threads, lambda: c.monitor("help"),
                     lambda: c.set_breakpoint(SYMBOLS["tick"]), lambda: c.write_register("rax", 1), c.resume):
            with pytest.raises(TargetRunning):
                call()
        assert_running(demo)  # none of them reached QEMU (any packet would have stopped it)
        stop = c.halt()
        assert stop.kind == "signal" and not c.running
        regs = c.registers()  # the state is not confused: a real register set
        assert SYMBOLS["pvh_entry"] < regs["rip"] < SYMBOLS["counter"]
        before = counter(demo)
        time.sleep(0.3)
        assert counter(demo) == before  # halted for real
        c.detach()
    assert_running(demo)


def test_handshake_errors_name_the_cause(demo):
    """Issue 12's glue: the two mistakes that used to end in a bare
    qSupported timeout say what they are."""
    started = time.monotonic()
    with pytest.raises(NotAGdbStub, match="QMP monitor, not its GDB stub"):
        Client.connect(demo.qmp, timeout=5)  # --gdb given the QMP address
    assert time.monotonic() - started < 4  # told by the greeting, not by a timeout
    with Client.connect(demo.gdb, timeout=5) as first:
        with pytest.raises(StubBusy, match="another debugger attached"):
            Client.connect(demo.gdb, timeout=2)
        first.detach()
    # QEMU accepts the refused connection (closed by now) once the first
    # debugger leaves, and pauses the guest on accepting it, as on every
    # connection; the next debugger still gets the stub at once.
    assert_attaches_at_once(demo)
    assert_running(demo)


def test_close_removes_every_breakpoint_and_watchpoint_it_inserted(demo):
    """QEMU keeps a debugger's breakpoints after its connection closes (only
    the next debugger's ``?`` or a ``D`` clears them): a guest resumed from
    QMP would stop for good at ``tick`` (run all the time) or on a write to
    ``counter`` (written all the time), with nobody to tell."""
    from vmscope.client.helpers.qemu import QemuMonitor

    with Client.connect(demo.gdb, timeout=10) as c:
        c.set_breakpoint(SYMBOLS["tick"])
        c.set_breakpoint(SYMBOLS["tick"] + 1, hardware=True)
        c.set_watchpoint(SYMBOLS["counter"], 8, "write")
    qmp = QemuMonitor(demo.qmp, timeout=10)
    try:
        assert not qmp.command("query-status")["running"]  # closed, not detached: left stopped
        qmp.command("cont")
        assert_running(demo)
    finally:
        qmp.close()
