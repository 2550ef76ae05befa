"""Which task runs on a stopped vCPU, which Linux CPU a vCPU is, and one task
by its address or pid: the helpers a probe needs at every hit, named after
the kernel's (``current``, ``task_cpu``) and drgn's (``find_task``).

A debugger sees vCPUs as threads of the stub, numbered by the stub; Linux
numbers CPUs its own way (in the order it brought them up). The vCPU's own
registers say which CPU it is, without trusting the stub's numbering:

- x86_64: the kernel's GS base *is* ``__per_cpu_offset[cpu]`` (per-CPU
  variables are reached as ``%gs:var``); in user mode the kernel's value sits
  in ``KERNEL_GS_BASE`` until ``swapgs``. ``current`` is the per-CPU
  ``current_task`` (Linux <= 6.1) or ``pcpu_hot.current_task`` (6.2+) read
  through that base.
- arm64: the kernel keeps ``current`` in ``SP_EL0`` while at EL1, and the
  per-CPU offset in ``TPIDR_EL1`` (``TPIDR_EL2`` under VHE); from user mode
  ``current`` is the per-CPU ``__entry_task``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from vmscope.vmi.errors import VmiError
from vmscope.vmi.linux.btf import has_member
from vmscope.vmi.linux.tasks import PF_KTHREAD, Task, per_cpu_offsets, state_letter

if TYPE_CHECKING:
    from vmscope.vmi.linux.kernel import LinuxKernel

MASK64 = (1 << 64) - 1


def cpu_of_offsets(kernel: LinuxKernel) -> dict[int, int]:
    """``{__per_cpu_offset[cpu]: cpu}``, computed once per kernel (the table
    is fixed once the kernel has booted)."""
    table = kernel._layouts.get("cpu_of_offset")
    if table is None:
        table = kernel._layouts["cpu_of_offset"] = {off: cpu for cpu, off in enumerate(per_cpu_offsets(kernel))}
    return table


def _per_cpu_base(kernel: LinuxKernel, regs: Mapping[str, int | None]) -> int | None:
    """This vCPU's per-CPU offset from its registers, or None if they (or
    kallsyms, without data symbols) lack it."""
    try:
        known = cpu_of_offsets(kernel)
    except (KeyError, VmiError):
        return None
    if kernel.arch == "aarch64":
        names = ("TPIDR_EL1", "tpidr_el1", "TPIDR_EL2", "tpidr_el2")
    else:
        user = bool((regs.get("cs") or 0) & 3)
        names = ("k_gs_base", "gs_base") if user else ("gs_base", "k_gs_base")
    for name in names:
        value = regs.get(name)
        if value is not None and value in known:
            return value
    return None


def cpu_from_registers(kernel: LinuxKernel, regs: Mapping[str, int | None], tid: int | None = None) -> int:
    """The Linux CPU number of the vCPU whose registers are ``regs``.

    From the per-CPU base register when the stub reports it; otherwise the
    stub's thread number minus one (QEMU and vmscope number vCPUs from 1 in
    the order Linux brings them up), which ``tid`` must then give."""
    base = _per_cpu_base(kernel, regs)
    if base is not None:
        return cpu_of_offsets(kernel)[base]
    sp_el0 = _arm64_current(kernel, regs)
    if sp_el0 is not None:  # arm64 without per-CPU symbols: where current says it runs
        cpu = task_cpu(kernel, sp_el0)
        if cpu is not None:
            return cpu
    if tid is None:
        raise VmiError("the stub reports no per-CPU base register (gs_base / TPIDR_EL1) and no thread was given: "
                       "cannot tell which Linux CPU this vCPU is")
    return tid - 1


def _arm64_current(kernel: LinuxKernel, regs: Mapping[str, int | None]) -> int | None:
    """SP_EL0 when an arm64 vCPU is in the kernel (EL1, or EL2 under VHE),
    where the kernel keeps ``current``; else None."""
    if kernel.arch != "aarch64":
        return None
    cpsr = regs.get("cpsr") or 0
    sp_el0 = regs.get("SP_EL0") or regs.get("sp_el0")
    return sp_el0 if (cpsr >> 2) & 3 >= 1 and sp_el0 else None


def _percpu_current_var(kernel: LinuxKernel) -> int:
    if kernel.arch == "aarch64":
        return kernel.address_of("__entry_task")
    if "current_task" in kernel.symbols:
        return kernel.symbols["current_task"]
    return kernel.address_of("pcpu_hot") + kernel.btf.offsetof("pcpu_hot", "current_task")


def current_task(kernel: LinuxKernel, regs: Mapping[str, int | None], tid: int | None = None) -> int:
    """Address of the ``task_struct`` running on the stopped vCPU whose
    registers are ``regs`` (the kernel's ``current``)."""
    current = _arm64_current(kernel, regs)
    if current is not None:
        return current
    var = _percpu_current_var(kernel)
    base = _per_cpu_base(kernel, regs)
    if base is None:
        base = per_cpu_offsets(kernel)[cpu_from_registers(kernel, regs, tid)]
    return kernel.u64((var + base) & MASK64)


def _task_fields(kernel: LinuxKernel):
    cached = kernel._layouts.get("task_from_address")
    if cached is None:
        state = "__state" if has_member(kernel.btf, "task_struct", "__state") else "state"
        paths = ["pid", "tgid", "comm", "real_parent", state, "exit_state", "flags", "start_time"]
        cpu_path = next((p for p in ("cpu", "thread_info.cpu") if has_member(kernel.btf, "task_struct", p)), None)
        if cpu_path:
            paths.append(cpu_path)
        fields, lo, hi = kernel.layout("task_struct", paths)
        decoders = {p: kernel.decoder(f, lo) for p, f in fields.items()}
        tgid_off = kernel.btf.offsetof("task_struct", "tgid")
        cached = kernel._layouts["task_from_address"] = (decoders, lo, hi, state, cpu_path, tgid_off)
    return cached


def task_from_address(kernel: LinuxKernel, address: int, *, running_cpu: int | None = None) -> Task:
    """A :class:`Task` from a ``task_struct`` address, in two reads (the
    struct's window, the parent's tgid) instead of a walk of every task.
    ``running_cpu`` marks it as running there (the caller knows it is
    ``current``); otherwise ``cpu`` is left empty, as in :func:`tasks`."""
    decoders, lo, hi, state_field, _cpu_path, tgid_off = _task_fields(kernel)
    data = kernel.read(address + lo, hi - lo)
    v = {p: dec(data) for p, dec in decoders.items()}
    if not 0 <= v["pid"] < 1 << 22 or not 0 <= v["tgid"] < 1 << 22:
        raise VmiError(f"0x{address:x} does not look like a task_struct (pid {v['pid']}, tgid {v['tgid']})")
    parent = v["real_parent"]
    if v["pid"] == 0 or parent == address or not parent:
        ppid = 0
    else:
        ppid = int.from_bytes(kernel.read(parent + tgid_off, 4), "little")
    return Task(pid=v["pid"], tgid=v["tgid"], ppid=ppid, comm=v["comm"], state=state_letter(v[state_field],
                v["exit_state"]), kernel_thread=bool(v["flags"] & PF_KTHREAD) or v["pid"] == 0, address=address,
                start_time_ns=v["start_time"], cpu=running_cpu)


def task_cpu(kernel: LinuxKernel, task: Task | int) -> int | None:
    """The CPU a task last ran on (the kernel's ``task_cpu()``), or None if
    this kernel's BTF has no ``cpu`` field in reach."""
    address = task.address if isinstance(task, Task) else task
    _decoders, _lo, _hi, _state, cpu_path, _tgid = _task_fields(kernel)
    return kernel.member(address, "task_struct", cpu_path) if cpu_path else None


def find_task(kernel: LinuxKernel, pid: int) -> Task:
    """The task (process or thread) with this pid, as drgn's ``find_task``;
    a clear error if there is none."""
    from vmscope.vmi.linux.tasks import tasks

    for t in tasks(kernel, threads=True):
        if t.pid == pid:
            return t
    raise VmiError(f"no task with pid {pid} in the guest")
