#!/usr/bin/env python3
"""Coverage-guided fuzzing of the stub (atheris, libFuzzer's engine) from
the bytes on the wire up: framing (acks, run-length encoding, escapes,
checksums, 0x03), every packet parser, and the session over a real target.

    python tests/fuzz/rsp_atheris.py [--target emu|kvm] [libFuzzer options] [CORPUS_DIR ...]

One input is what a debugger could send on one connection. The oracle, per
input: no exception escapes (the session runs strict), nothing is logged at
ERROR, every resume ends when interrupted (10 s), every byte the stub sends
parses as acks and well-formed packets, and afterwards the guest is intact:
its code bytes are the ELF's (every breakpoint removed) and no page stays
protected (the guest runs on and writes its counter). Between inputs the
guest's registers and low memory are put back, so inputs do not depend on
each other and a fixed seed gives the same campaign.

Run by tests/fuzz/test_atheris_campaign.py (short, fixed seed) and by
bench/fuzz.py (long, with packets/s and coverage).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import select
import sys
import time

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports(include=["vmscope.rsp", "vmscope.gdbserver"]):
    from vmscope.gdbserver.session import PACKET_SIZE, Session
    from vmscope.rsp.framing import Ack, BadPacket, Endpoint, Interrupt, Nack, Packet

from vmscope.gdbserver.target import TargetError  # noqa: E402
from vmscope.machine import MachineConfig  # noqa: E402

#: packets that end the guest or the session, or move a pc to an address (a guest without an IDT then
#: triple-faults): tested elsewhere, left out here
SKIPPED = (b"k", b"vKill", b"D", b"R", b"vRun", b"vAttach", b"!")
#: guest-physical memory restored between inputs (the demo guest, its tables and stacks live here)
LOW_MEMORY = 4 << 20


class ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(self.format(record))


def writes_files(payload: bytes) -> bool:
    """``monitor dump PATH`` writes a file where the VMM runs: not from fuzzed bytes."""
    if not payload.startswith(b"qRcmd,"):
        return False
    try:
        return bytes.fromhex(payload[6:].decode()).lstrip().startswith(b"dump")
    except ValueError:
        return False


def moves_pc(payload: bytes) -> bool:
    """``c ADDR``, ``s ADDR``, ``C sig;ADDR``, ``S sig;ADDR``: resume at an address."""
    head = payload[:1]
    if head in (b"c", b"s") and len(payload) > 1:
        return True
    return head in (b"C", b"S") and b";" in payload


class Harness:
    def __init__(self, target_kind: str):
        from vmscope.guests import guest_elf

        config = MachineConfig(arch="x86_64", cpus=2, serial_out=io.BytesIO())
        if target_kind == "kvm":
            from vmscope.kvm.x86.machine import KvmMachine

            self.machine = KvmMachine(config)
            ram = self.machine.mem
        else:
            from vmscope.emu import EmuMachine

            self.machine = EmuMachine(config)
            ram = self.machine.ram
        self.ram = ram
        self.machine.start(paused=True)
        self.target = self.machine.debug_target()
        self.errors = ErrorLog()
        logging.getLogger("vmscope").addHandler(self.errors)
        # the stub's first stop, as a debugger's attach gets it; then let the guest reach its main loop
        # (long mode on every vCPU), the state restored between inputs: the 32-bit entry state cannot be
        # put back through GDB's registers (they carry selectors, not the descriptors behind them)
        self.target.initial_stop()
        warmup = Session(self.target, strict=True)
        warmup.handle(b"vCont;c")
        time.sleep(0.3)
        self.settle(warmup)
        self.threads = list(self.target.threads())
        self.registers = {tid: dict(self.target.read_registers(tid)) for tid in self.threads}
        self.low = ram.read(ram.base, LOW_MEMORY)
        from elftools.elf.elffile import ELFFile

        with open(guest_elf("demo"), "rb") as f:
            elf = ELFFile(f)
            loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
            self.code = []  # (physical address, bytes) of every executable section
            for sec in elf.iter_sections():
                if sec["sh_flags"] & 4 and sec["sh_type"] == "SHT_PROGBITS" and sec["sh_size"]:
                    seg = next(s for s in loads if s["p_vaddr"] <= sec["sh_addr"] < s["p_vaddr"] + s["p_memsz"])
                    self.code.append((seg["p_paddr"] + sec["sh_addr"] - seg["p_vaddr"], sec.data()))
            self.counter = next(s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()
                                if s.name == "counter")
        self.packets = 0

    def settle(self, session: Session) -> None:
        if not session.running:
            return
        self.target.interrupt()
        r, _, _ = select.select([self.target.stop_fd()], [], [], 10)
        if not r:
            raise AssertionError("hang: the target did not stop within 10 s of an interrupt")
        event = self.target.take_stop()
        if event is not None:
            session.on_stop(event)
        session.running = False

    def restore(self) -> None:
        self.ram.write(self.ram.base, self.low)
        for tid, regs in self.registers.items():
            now = self.target.read_registers(tid)
            for name, value in regs.items():  # only what the input changed, one by one
                if now.get(name) != value:
                    try:
                        self.target.write_registers(tid, {name: value})
                    except TargetError:
                        pass  # one the back end keeps read-only (the input could not have changed it either)

    def one(self, data: bytes) -> None:
        self.errors.records.clear()
        session = Session(self.target, strict=True)
        stub = Endpoint(rle_replies=True, max_packet=PACKET_SIZE + 64)
        try:
            for ev in stub.receive(data):
                if isinstance(ev, Packet):
                    self.packets += 1
                    if ev.payload.startswith(SKIPPED) or moves_pc(ev.payload) or writes_files(ev.payload):
                        continue
                    reply = session.handle(ev.payload)
                    if reply is not None:
                        stub.send(reply)
                    if session.noack_pending:
                        stub.disable_acks()
                        session.noack_pending = False
                    if session.running:
                        self.settle(session)
                        stub.send(b"S05")  # stand-in for the stop reply the transport would send
                    if session.closed:
                        break
                elif isinstance(ev, Interrupt):
                    session.interrupt()
                elif isinstance(ev, BadPacket) and ev.oversized:
                    stub.send(b"E16")
            self.check_wire(stub.data_to_send())
        finally:
            self.settle(session)
            session.cleanup()
        if self.errors.records or session.internal_errors:
            raise AssertionError("internal error in the session:\n" + "\n".join(self.errors.records))
        self.check_code()  # before the restore, which would paper over a breakpoint byte left behind
        self.restore()  # what the input did to registers and memory is its right; put it back
        self.check_runs()  # ... then no stub state (a protected page, a parked vCPU) may hold the guest

    @staticmethod
    def check_wire(out: bytes) -> None:
        peer = Endpoint()
        for ev in peer.receive(out):
            if not isinstance(ev, (Ack, Nack, Packet)):
                raise AssertionError(f"the stub sent something malformed: {ev!r}")
        if peer._buf.strip(b"+-"):
            raise AssertionError(f"the stub sent a partial packet: {bytes(peer._buf[:80])!r}")

    def check_code(self) -> None:
        for paddr, data in self.code:
            if self.ram.read(paddr, len(data)) != data:
                raise AssertionError(f"guest code at {paddr:#x} differs from the ELF (a breakpoint left in?)")

    def check_runs(self) -> None:
        """No page left protected, no vCPU left parked: resumed, the guest
        makes progress (its counter moves, or every vCPU leaves the pc it
        was stopped at). Polled, so a healthy guest costs a millisecond."""
        session = Session(self.target, strict=True)
        pcs = {tid: self.target.read_registers(tid).get("rip") for tid in self.threads}
        before = self.ram.read(self.counter, 8)
        moved: set[int] = set()
        session.handle(b"vCont;c")
        deadline = time.monotonic() + 3
        while self.ram.read(self.counter, 8) == before and time.monotonic() < deadline:
            time.sleep(0.001)
        progressed = self.ram.read(self.counter, 8) != before
        self.settle(session)
        if not progressed:  # the counter may be one CPU's work: then every vCPU must at least have moved
            moved = {tid for tid in self.threads if self.target.read_registers(tid).get("rip") != pcs[tid]}
        session.cleanup()
        if not progressed and moved != set(self.threads):
            where = {tid: hex(self.target.read_registers(tid).get("rip", 0)) for tid in self.threads}
            raise AssertionError(f"the guest makes no progress after the input (a page left protected, a vCPU "
                                 f"parked?); pc of each vCPU: {where}")


def main() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--target", choices=("emu", "kvm"), default="emu")
    ap.add_argument("--replay", metavar="DIR", help="run every file of DIR once, without the fuzzer (for coverage)")
    known, rest = ap.parse_known_args()
    harness = Harness(known.target)
    if known.replay:  # libFuzzer ends the process without Python's finalization: coverage needs a plain loop
        for name in sorted(os.listdir(known.replay)):
            path = os.path.join(known.replay, name)
            if os.path.isfile(path) and not name.startswith("."):
                with open(path, "rb") as f:
                    harness.one(f.read())
        print(f"vmscope-fuzz: replayed {harness.packets} packets", file=sys.stderr)
        harness.machine.shutdown()
        return

    started = time.monotonic()
    inputs = 0

    def test_one_input(data: bytes) -> None:
        nonlocal inputs
        harness.one(data)
        inputs += 1
        if inputs % 250 == 0:  # libFuzzer ends the process itself (no atexit): report as we go
            took = time.monotonic() - started
            print(f"vmscope-fuzz: {inputs} inputs, {harness.packets} packets in {took:.1f} s "
                  f"({harness.packets / max(took, 1e-9):.0f} packets/s)", file=sys.stderr, flush=True)

    atheris.Setup([sys.argv[0], *rest], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
