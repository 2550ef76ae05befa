"""An inspection session: a stub connection, optional QMP, and the fastest
way to guest-physical memory, chosen automatically.

Order tried: QEMU's shared RAM through QMP; vmscope's VMM memfd (named by
the stub's ``monitor memory``); physical reads over RSP. Writes go through
the same source. The guest is kept stopped while we look (a GDB stub stops
it on connect; with QMP only we ``stop`` it) and page-table caches are
dropped whenever it resumes.
"""

from __future__ import annotations

import atexit
from typing import Callable, Iterable

from vmscope.client.client import Client
from vmscope.client.helpers.qemu import NoSharedRam, QemuMonitor, QmpError
from vmscope.client.helpers.rsp import RspPhysicalMemory
from vmscope.client.helpers.vmscope import vmscope_ram
from vmscope.vmi.errors import VmiError
from vmscope.vmi.memory import PhysicalMemory
from vmscope.vmi.paging.base import TranslationCache

SYSTEM_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "fs_base", "gs_base", "k_gs_base")


class Inspector:
    """``Inspector(gdb="localhost:1234", qmp="localhost:4444")``.

    ``memory`` forces a path: ``"auto"``, ``"shared"`` (QMP shared RAM),
    ``"vmscope"`` (the VMM's memfd) or ``"rsp"``.
    """

    def __init__(self, gdb: str | None = None, qmp: str | None = None, *, memory: str = "auto",
                 timeout: float = 10.0, progress: Callable[[str, int, int], None] | None = None,
                 system_map: str | None = None, disk_cache: bool = True):
        if not gdb and not qmp:
            raise ValueError("give a GDB stub address (--gdb HOST:PORT), a QMP address (--qmp HOST:PORT) or both")
        if memory not in ("auto", "shared", "vmscope", "rsp"):
            raise ValueError(f"unknown memory path {memory!r}: use auto, shared, vmscope or rsp")
        self.client: Client | None = None
        self.qmp: QemuMonitor | None = None
        self.timeout = timeout
        self._probes = None
        self._resume_qmp = False
        self._closed = False
        try:
            self._connect(gdb, qmp, timeout)
        except BaseException:
            # A half-built Inspector must not keep the stub: QEMU would stay
            # paused and serve no other debugger (one connection at a time).
            try:
                self.close()
            except Exception:
                pass  # the error that brought us here is the one to report
            raise
        self.cache = TranslationCache()
        if self.client:
            self.client.on_resume(self.cache.invalidate)
        self.progress = progress
        self.system_map = system_map
        self.disk_cache = disk_cache
        self._memory_choice = memory
        self._phys: PhysicalMemory | None = None
        self._memory_path = ""
        self._kernel = None
        # A script that ends without close() (an exception outside a with,
        # sys.exit) must still leave the guest running and clean.
        atexit.register(self._close_at_exit)

    def _connect(self, gdb: str | None, qmp: str | None, timeout: float) -> None:
        self.client = Client.connect(gdb, timeout=timeout) if gdb else None
        self.qmp = QemuMonitor(qmp, timeout=timeout) if qmp else None
        if self.qmp and not self.client:
            status = self.qmp.command("query-status")
            if status.get("running"):
                self.qmp.command("stop")
                self._resume_qmp = True

    @property
    def phys(self) -> PhysicalMemory:
        """Guest-physical memory by the fastest path that works (chosen on
        first use, so ``regs`` works even where no memory path does)."""
        if self._phys is None:
            self._phys, self._memory_path = self._choose_memory(self._memory_choice)
        return self._phys

    @property
    def memory_path(self) -> str:
        self.phys
        return self._memory_path

    def _choose_memory(self, memory: str) -> tuple[PhysicalMemory, str]:
        reasons = []
        if memory in ("auto", "shared") and self.qmp:
            try:
                return self.qmp.shared_ram(writable=True), "qemu-shared-ram"
            except (NoSharedRam, QmpError, OSError) as e:
                reasons.append(str(e))
                if memory == "shared":
                    raise
        if memory in ("auto", "vmscope") and self.client:
            ram = vmscope_ram(self.client, writable=True)
            if ram is not None:
                return ram, "vmscope-memfd"
            reasons.append("the stub names no vmscope RAM memfd")
        if memory in ("auto", "rsp") and self.client:
            try:
                return RspPhysicalMemory(self.client), "rsp"
            except VmiError as e:
                reasons.append(str(e))
        raise VmiError(f"no way to read guest-physical memory with --memory {memory}: {'; '.join(reasons) or 'no stub'}")

    def close(self) -> None:
        """Detach (the guest runs on, every breakpoint removed, QEMU's memory
        mode virtual again) and close QMP, whatever state the guest is in."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        try:
            if self._probes is not None and self.client:
                try:
                    self._probes._disarm()
                except Exception:
                    pass  # detach below removes whatever is left
            if self.client:
                self.client.detach()
        finally:
            if self.qmp:
                try:
                    if self._resume_qmp:
                        self.qmp.command("cont")
                finally:
                    self.qmp.close()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception:  # the stub may be gone by now; nothing left to clean
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ registers

    def registers(self) -> dict[str, int]:
        """General and system registers: the stub's, completed by QMP's
        ``info registers`` for what the stub lacks (EFER, CR*, GDTR/IDTR...)."""
        regs: dict[str, int] = {}
        if self.client:
            regs.update({k: v for k, v in self.client.registers().items() if v is not None})
        if self.qmp:
            try:
                for name, value in self.qmp.x86_system_registers().items():
                    regs.setdefault(name, value)
            except QmpError:
                pass
        return regs

    # ------------------------------------------------------------ the OS

    def kernel(self):
        """The :class:`~vmscope.vmi.linux.kernel.LinuxKernel` in this guest."""
        if self._kernel is None and self.client and self.client.arch and "aarch64" in self.client.arch:
            self._kernel = self._arm64_kernel()
        if self._kernel is None:
            from vmscope.vmi.linux.kernel import LinuxKernel

            regs = self.registers()
            if "cr3" not in regs:
                raise VmiError("cannot find the page-table root: the stub reports no cr3 (give --qmp too)")
            self._kernel = LinuxKernel(self.phys, regs["cr3"], regs.get("cr4", 0), cache=self.cache,
                                       progress=self.progress, system_map=self.system_map,
                                       disk_cache=self.disk_cache)
        return self._kernel

    def _arm64_kernel(self):
        from vmscope.vmi.linux.kernel import Arm64LinuxKernel

        c = self.client
        names = {"ttbr0": ("TTBR0_EL1",), "ttbr1": ("TTBR1_EL1",), "tcr": ("TCR_EL1",), "vbar": ("VBAR_EL1", "VBAR")}
        regs = {}
        for key, candidates in names.items():
            name = next((n for n in candidates if n in c.layout), None)
            if name is None:
                raise VmiError(f"the stub does not expose {candidates[0]}, needed to walk an arm64 guest's tables")
            regs[key] = c.register(name)
        cpsr = c.register("cpsr")
        in_el1 = (cpsr >> 2) & 3 == 1
        current = c.register("SP_EL0") if in_el1 and "SP_EL0" in c.layout else None  # arm64 keeps current there
        return Arm64LinuxKernel(self.phys, regs["ttbr0"], regs["ttbr1"], regs["tcr"], regs["vbar"],
                                current_task=current, cache=self.cache, progress=self.progress,
                                system_map=self.system_map, disk_cache=self.disk_cache)

    def address_of(self, name: str) -> int:
        """A kernel symbol's address (KASLR applied): the one spelling."""
        return self.kernel().address_of(name)

    # ------------------------------------------------------------ execution and probes

    _DEFAULT = object()

    def cont(self, timeout=_DEFAULT):
        """Continue until the next stop, waiting at most the Inspector's
        ``timeout`` (``timeout=None`` waits for ever). On a timeout the
        guest is still running: :meth:`close` stops and cleans it."""
        if self.client is None:
            raise VmiError("continuing needs a GDB stub (--gdb)")
        return self.client.cont(self.timeout if timeout is self._DEFAULT else timeout)

    @property
    def probes(self):
        """This Inspector's :class:`~vmscope.client.probe.ProbeSet`."""
        if self._probes is None:
            from vmscope.client.probe import ProbeSet

            self._probes = ProbeSet(self)
        return self._probes

    def probe(self, symbols: str | Iterable[str], callback=None, *, condition=None, hardware: bool = False):
        """A probe on one or more kernel functions. With a callback, returns
        the :class:`~vmscope.client.probe.Probe`; without one, a decorator::

            @vm.probe("__x64_sys_openat", condition=lambda hit: hit.task.comm == "cat")
            def opened(hit): print(hit.task.pid, hit.user_string(hit.args["filename"]))

        ``hardware`` uses a hardware breakpoint (no byte of kernel text changes)."""
        if callback is not None:
            return self.probes.add(symbols, callback, condition=condition, hardware=hardware)

        def decorate(fn):
            self.probes.add(symbols, fn, condition=condition, hardware=hardware)
            return fn
        return decorate

    def run(self, hits: int | None = None, seconds: float | None = None):
        """Let the guest run, serving the probes, until ``hits`` hits or
        ``seconds`` seconds; see :meth:`~vmscope.client.probe.ProbeSet.run`."""
        return self.probes.run(hits=hits, seconds=seconds)

    def drgn(self, vmlinux: str | None = None):
        """A ``drgn.Program`` over the same guest memory (needs ``pip install drgn``)."""
        from vmscope.vmi.linux.drgn_program import drgn_program

        return drgn_program(self.kernel(), vmlinux)
