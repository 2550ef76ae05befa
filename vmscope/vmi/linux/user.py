"""A process's own memory, read through its own page tables (``mm->pgd``),
as the kernel's ``access_process_vm`` does, with errors that say which
process and which address space an address was looked for in.

A user pointer (a syscall's ``filename``) means something only in the
address space of the process that passed it: the kernel's tables map user
addresses of whichever process last ran, if any. So these helpers take the
task, and a probe passes the task that was current at the hit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmscope.vmi.address_space import AddressSpace
from vmscope.vmi.errors import TranslationError, VmiError
from vmscope.vmi.linux.tasks import Task

if TYPE_CHECKING:
    from vmscope.vmi.linux.kernel import LinuxKernel


class UserMemoryError(VmiError):
    """A user address the process's page tables do not map (never touched,
    swapped out, or not an address of this process at all)."""

    def __init__(self, task: Task, addr: int, size: int, pgd: int | None, cause: Exception):
        where = f" (mm->pgd 0x{pgd:x})" if pgd is not None else ""
        super().__init__(f"pid {task.pid} ({task.comm}): 0x{addr:x} (+{size}) is not mapped in its user address "
                         f"space{where}: {cause}")
        self.task, self.addr, self.size, self.pgd = task, addr, size, pgd


def user_address_space(kernel: LinuxKernel, task: Task) -> AddressSpace:
    """The address space of ``task``'s process (its ``mm->pgd``): user
    addresses as that process sees them, kernel addresses as every process does."""
    # Not cached: a task_struct's address is reused once the task exits,
    # and two reads (mm, pgd) cost little next to the walk itself.
    return kernel.process_address_space(task)


def _pgd(kernel: LinuxKernel, task: Task) -> int | None:
    try:
        mm = kernel.member(task.address, "task_struct", "mm")
        return kernel.member(mm, "mm_struct", "pgd") if mm else None
    except VmiError:
        return None


def user_read(kernel: LinuxKernel, task: Task, addr: int, size: int) -> bytes:
    """``size`` bytes at ``addr`` in ``task``'s address space."""
    aspace = user_address_space(kernel, task)
    try:
        return aspace.read(addr, size)
    except TranslationError as e:
        raise UserMemoryError(task, addr, size, _pgd(kernel, task), e) from None


def user_string(kernel: LinuxKernel, task: Task, addr: int, limit: int = 4096) -> str:
    """A NUL-terminated string at ``addr`` in ``task``'s address space (the
    kernel's ``strncpy_from_user``), at most ``limit`` bytes."""
    if not addr:
        raise VmiError(f"pid {task.pid} ({task.comm}): NULL string pointer")
    aspace = user_address_space(kernel, task)
    try:
        return aspace.cstring(addr, limit)
    except TranslationError as e:
        raise UserMemoryError(task, addr, 1, _pgd(kernel, task), e) from None
