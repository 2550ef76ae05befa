"""Dump a live guest through any gdbstub (and QMP where there is one).

The guest stays stopped for the copy (a GDB connection stops it) and runs
on when the stub is detached. RAM comes from the fastest memory path the
:class:`~vmscope.client.session.Inspector` found; which RAM there is comes
from that path (shared RAM and vmscope's memfd know their regions), else
from QMP's memory tree, else from the guest kernel's own "System RAM"
resources. Registers come from the stub, one thread per vCPU, completed by
QMP's ``info registers`` for what QEMU's stub lacks (CR3, CR4).
"""

from __future__ import annotations

import logging
from typing import Callable

from vmscope.dump.elfcore import DumpPlan, write_core
from vmscope.vmi.errors import VmiError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def ram_regions(ins) -> list[tuple[int, int]]:
    """(guest-physical address, size) of every RAM region of the guest."""
    regions = getattr(ins.phys, "regions", None)
    if regions:
        return [(r.gpa, r.size) for r in regions]
    if ins.qmp is not None:
        return [(r.gpa, r.size) for r in ins.qmp.ram_ranges()]
    return kernel_ram_regions(ins.kernel())


def kernel_ram_regions(kernel) -> list[tuple[int, int]]:
    """The "System RAM" resources under ``iomem_resource``, as /proc/iomem
    lists them: what the kernel itself counts as RAM."""
    out = []
    stack = [kernel.member(kernel.symbols["iomem_resource"], "resource", "child")]
    seen = 0
    while stack:
        res = stack.pop()
        while res and seen < 100_000:
            seen += 1
            name_ptr = kernel.member(res, "resource", "name")
            name = kernel.read(name_ptr, 32).split(b"\0", 1)[0] if name_ptr else b""
            start, end = kernel.member(res, "resource", "start"), kernel.member(res, "resource", "end")
            if name == b"System RAM" and end > start:
                out.append((start, end - start + 1))
            elif name != b"System RAM":
                child = kernel.member(res, "resource", "child")
                if child:
                    stack.append(child)
            res = kernel.member(res, "resource", "sibling")
    if not out:
        raise VmiError("the guest kernel lists no System RAM in iomem_resource")
    return sorted(out)


def vcpu_registers(ins) -> list[dict[str, int]]:
    """Each vCPU's registers, in vCPU order."""
    client = ins.client
    cpus = []
    for i, tid in enumerate(client.threads()):
        client.select_thread(tid)
        regs = {k: v for k, v in client.registers().items() if v is not None}
        if ins.qmp is not None and ("cr3" not in regs or "cr4" not in regs):
            try:
                for k, v in ins.qmp.x86_system_registers(cpu=i).items():
                    regs.setdefault(k, v)
            except Exception as e:  # QMP is a bonus here: a dump without CR3 is still a dump
                log.warning("no system registers from QMP for vCPU %d: %s", i, e)
        cpus.append(regs)
    return cpus


def guest_vmcoreinfo(ins) -> bytes | None:
    """The guest kernel's VMCOREINFO text: as the kernel prepared it, else
    rebuilt from kallsyms (what crash and drgn need to find the kernel);
    None for a guest that is not a Linux kernel we can read."""
    from vmscope.vmi.linux.drgn_program import guest_vmcoreinfo as exported
    from vmscope.vmi.linux.kernel import _search_vmcoreinfo

    try:
        kernel = ins.kernel()
    except VmiError as e:
        log.warning("no Linux kernel found (%s): the dump has no VMCOREINFO", e)
        return None
    for source in (lambda: exported(kernel), lambda: _search_vmcoreinfo(kernel.phys)):
        try:
            return source()
        except VmiError:
            continue
    return rebuilt_vmcoreinfo(kernel)


def rebuilt_vmcoreinfo(kernel) -> bytes:
    """VMCOREINFO made from what vmscope found in memory, for a kernel that
    did not export it (CONFIG_CRASH_CORE off): the lines crash and drgn
    read to place the kernel."""
    syms = kernel.symbols
    banner = kernel.banner()
    release = banner.split()[2] if banner.startswith("Linux version ") else "unknown"
    lines = [f"OSRELEASE={release}", "PAGESIZE=4096"]
    for name in ("init_uts_ns", "_stext", "swapper_pg_dir", "init_top_pgt", "node_online_map", "_text"):
        if name in syms:
            lines.append(f"SYMBOL({name})={syms[name]:x}")
    if kernel.arch == "x86_64":
        lines.append(f"NUMBER(phys_base)={kernel.phys_base:d}")
        lines.append("NUMBER(pgtable_l5_enabled)=0")
    lines.append(f"KERNELOFFSET={kernel.slide & (2**64 - 1):x}")
    return ("\n".join(lines) + "\n").encode()


def dump_guest(ins, out_path: str, progress: Progress | None = None) -> DumpPlan:
    """Write the guest behind ``ins`` (stopped) to ``out_path``."""
    arch = "aarch64" if ins.client and ins.client.arch and "aarch64" in ins.client.arch else "x86_64"
    plan = DumpPlan(arch, ram_regions(ins), vcpu_registers(ins), guest_vmcoreinfo(ins))
    phys = ins.phys
    with open(out_path, "wb") as f:
        write_core(f, plan, phys.read, progress=progress)
    return plan
