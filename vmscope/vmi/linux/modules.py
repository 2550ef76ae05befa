"""Loaded modules: the ``modules`` list, like ``/proc/modules``."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmscope.vmi.linux.btf import has_member

if TYPE_CHECKING:
    from vmscope.vmi.linux.kernel import LinuxKernel


@dataclass(frozen=True)
class Module:
    name: str
    size: int
    refcount: int
    state: str
    base: int
    address: int  # the struct module
    used_by: tuple[str, ...] = ()  # modules that depend on this one (/proc/modules' 4th column)


def modules(kernel: LinuxKernel) -> list[Module]:
    """Loaded modules, most recently loaded first (as ``/proc/modules``)."""
    btf = kernel.btf
    states = btf.enumerators("module_state")
    out = []
    for addr in kernel.list_entries(kernel.symbols["modules"], "module", "list"):
        data = kernel.fetch(addr, "module")
        m = lambda path: kernel.member(addr, "module", path, data, addr)  # noqa: E731
        if has_member(btf, "module", "core_layout"):
            size = m("core_layout.size") + m("init_layout.size")
            base = m("core_layout.base")
        else:  # Linux 6.4+: mem[MOD_TEXT..]
            size, base = module_mem(kernel, addr, data)
        refcount = m("refcnt.counter") - 1 if has_member(btf, "module", "refcnt") else 0
        state = states.get(m("state"), str(m("state"))).removeprefix("MODULE_STATE_").capitalize()
        out.append(Module(m("name"), size, refcount, state, base, addr, module_users(kernel, addr)))
    return out

def module_users(kernel: LinuxKernel, mod: int) -> tuple[str, ...]:
    """Names on ``mod->source_list``: each ``struct module_use`` there
    links a module (``source``) that uses this one."""
    if not has_member(kernel.btf, "module", "source_list"):
        return ()
    head = mod + kernel.btf.offsetof("module", "source_list")
    names = []
    for use in kernel.list_entries(head, "module_use", "source_list"):
        source = kernel.member(use, "module_use", "source")
        names.append(kernel.member(source, "module", "name"))
    return tuple(names)

def module_mem(kernel: LinuxKernel, addr: int, data: bytes) -> tuple[int, int]:
    f = kernel.btf.field("module", "mem")
    elem = f.elem_size
    size_off = kernel.btf.offsetof("module_memory", "size")
    base_off = kernel.btf.offsetof("module_memory", "base")
    sizes = [struct.unpack_from("<I", data, f.offset + i * elem + size_off)[0] for i in range(f.count)]
    base = struct.unpack_from("<Q", data, f.offset + base_off)[0]
    return sum(sizes), base
