"""Processes: the ``init_task.tasks`` list, like ``ps``, and each
process's own address space and command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmscope.vmi.address_space import AddressSpace
from vmscope.vmi.errors import VmiError
from vmscope.vmi.linux.btf import has_member
from vmscope.vmi.paging.x86_64 import X86_64Paging

if TYPE_CHECKING:
    from vmscope.vmi.linux.kernel import LinuxKernel


@dataclass(frozen=True)
class Task:
    pid: int
    tgid: int
    ppid: int
    comm: str
    state: str  # ps letter: R S D T t X Z P I
    kernel_thread: bool
    address: int  # the task_struct
    start_time_ns: int = 0
    cpu: int | None = None  # the CPU it is running on (its ``current``), if any

    @property
    def kind(self) -> str:
        return "kernel" if self.kernel_thread else "user"


_STATE_LETTERS = "RSDTtXZPI"
TASK_REPORT = 0x7F
TASK_IDLE = 0x402  # TASK_UNINTERRUPTIBLE | TASK_NOLOAD
PF_KTHREAD = 0x00200000


def tasks(kernel: LinuxKernel, threads: bool = False) -> list[Task]:
    """Every process (thread-group leader) on the ``init_task.tasks`` list,
    init_task (pid 0) first; with ``threads``, each process's other threads
    follow it (from ``signal->thread_head``), as ``ps -T`` lists them."""
    if "init_task" in kernel.symbols:
        start = kernel.symbols["init_task"]
    else:
        start = _on_task_list(kernel, kernel.current_hint) if kernel.current_hint else None
        if start is None:
            start = init_task_by_content(kernel)
    if "task_state_field" not in kernel._layouts:
        kernel._layouts["task_state_field"] = "__state" if has_member(kernel.btf, "task_struct", "__state") else "state"
    state_field = kernel._layouts["task_state_field"]
    paths = ["pid", "tgid", "comm", "real_parent", state_field, "exit_state", "flags", "start_time", "tasks.next"]
    fields, lo, hi = kernel.layout("task_struct", paths)
    decoders = [(p, kernel.decoder(f, lo)) for p, f in fields.items()]
    tasks_off = fields["tasks.next"].offset

    def decode(addr: int) -> dict:
        data = kernel.read(addr + lo, hi - lo)
        return {p: dec(data) for p, dec in decoders}

    rows = []
    addr = start
    seen = set()
    while True:
        v = decode(addr)
        rows.append((addr, v))
        seen.add(addr)
        addr = v["tasks.next"] - tasks_off
        if addr == start:
            break
        if addr in seen or len(seen) > 1_000_000:
            raise VmiError("the task list loops without returning to where it started (corrupt or changing)")
    first = next((i for i, (_, v) in enumerate(rows) if v["pid"] == 0), 0)
    rows = rows[first:] + rows[:first]  # init_task (pid 0) first, as the kernel's list starts
    init = rows[0][0]
    if threads:
        rows = [row for addr, v in rows
                for row in [(addr, v)] + [(t, decode(t)) for t in _other_threads(kernel, addr, v)]]
    tgid_of = {addr: v["tgid"] for addr, v in rows if v["pid"] == v["tgid"]}
    try:
        running = {task: cpu for cpu, task in current_tasks(kernel).items()}
    except (KeyError, VmiError):
        running = {}  # no per-CPU symbols: leave the CPU column empty
    out = []
    for addr, v in rows:
        parent = v["real_parent"]
        if parent == addr or addr == init:
            ppid = 0
        else:
            ppid = tgid_of.get(parent)
            if ppid is None:
                ppid = kernel.member(parent, "task_struct", "tgid")
        out.append(Task(pid=v["pid"], tgid=v["tgid"], ppid=ppid, comm=v["comm"], cpu=running.get(addr),
                        state=state_letter(v[state_field], v["exit_state"]),
                        kernel_thread=bool(v["flags"] & PF_KTHREAD) or addr == init, address=addr,
                        start_time_ns=v["start_time"]))
    return out


INIT_TASK_COMM = b"swapper/0\0"  # init_task's comm once sched_init() made it CPU 0's idle task
DATA_SCAN_BYTES = 32 << 20  # .data starts right after init; init_task sits near its start


def init_task_by_content(kernel: LinuxKernel) -> int:
    """``init_task`` when kallsyms lacks it (Debian's arm64 kernel has no
    ``CONFIG_KALLSYMS_ALL``) and no vCPU stopped in the kernel names its
    current task (every one in user code). init_task is the only task in
    the kernel image's ``.data``, which follows the init sections (unmapped
    after boot); a ``swapper/0`` comm with pid 0, whose task-list
    neighbours point back at it, is it. Found once per kernel."""
    if "init_task" in kernel._layouts:
        return kernel._layouts["init_task"]
    comm_off = kernel.layout("task_struct", ["comm"])[0]["comm"].offset
    space, granule = kernel.aspace, 1 << 12
    for name in ("_einittext", "__init_begin", "_etext"):
        if name in kernel.symbols:
            pos = kernel.symbols[name] & ~(granule - 1)
            break
    else:
        pos = kernel.location.end
    scanned, limit = 0, pos + (256 << 20)
    carry, carry_end = b"", None  # the tail of the last read, for a comm across two reads
    while scanned < DATA_SCAN_BYTES and pos < limit:
        if not space.is_mapped(pos):
            pos += granule
            continue
        run = pos
        while run < pos + (1 << 20) and space.is_mapped(run):
            run += granule
        head = carry if carry_end == pos else b""
        data = head + space.read(pos, run - pos)
        base = pos - len(head)
        hit = data.find(INIT_TASK_COMM)
        while hit >= 0:
            task = base + hit - comm_off
            if _is_init_task(kernel, task):
                kernel._layouts["init_task"] = task
                return task
            hit = data.find(INIT_TASK_COMM, hit + 1)
        carry, carry_end = data[-len(INIT_TASK_COMM):], run
        scanned += run - pos
        pos = run
    raise VmiError("kallsyms has no init_task (no CONFIG_KALLSYMS_ALL), no running task is known and none was "
                   "found in the kernel's data: stop the guest in the kernel so its current task starts the walk")


def _on_task_list(kernel: LinuxKernel, task: int) -> int | None:
    """A task on the ``init_task.tasks`` list to start the walk from, given
    a hint of the running task (arm64: SP_EL0): the task itself, or its
    thread-group leader (only leaders are on the list); None when neither
    is linked there. SP_EL0 names ``current`` only once the exception
    entry has set it: a vCPU stopped in the entry's first instructions
    still holds the user stack pointer there."""
    try:
        for candidate in (task, kernel.member(task, "task_struct", "group_leader")):
            if _linked(kernel, candidate):
                return candidate
    except (VmiError, KeyError, ValueError):
        pass
    return None


def _is_init_task(kernel: LinuxKernel, task: int) -> bool:
    try:
        return kernel.member(task, "task_struct", "pid") == 0 and _linked(kernel, task)
    except (VmiError, KeyError, ValueError):
        return False


def _linked(kernel: LinuxKernel, task: int) -> bool:
    """Whether ``task`` is on a task list: both its ``tasks`` neighbours
    point back at it (a stale or made-up pointer does not)."""
    off = kernel.layout("task_struct", ["tasks.next"])[0]["tasks.next"].offset
    own = task + off
    nxt = kernel.member(task, "task_struct", "tasks.next")
    prev = kernel.member(task, "task_struct", "tasks.prev")
    return (kernel.member(nxt - off, "task_struct", "tasks.prev") == own
            and kernel.member(prev - off, "task_struct", "tasks.next") == own)


def _other_threads(kernel: LinuxKernel, leader: int, v: dict) -> list[int]:
    """The threads of ``leader``'s group other than itself: the list at
    ``signal->thread_head`` linked through ``thread_node`` (Linux 3.14+)."""
    if v["flags"] & PF_KTHREAD or v["pid"] == 0:
        return []  # kernel threads are alone in their group
    signal = kernel.member(leader, "task_struct", "signal")
    if not signal or not has_member(kernel.btf, "signal_struct", "thread_head"):
        return []
    head = signal + kernel.btf.offsetof("signal_struct", "thread_head")
    return [t for t in kernel.list_entries(head, "task_struct", "thread_node") if t != leader]


def process_address_space(kernel: LinuxKernel, task: Task) -> AddressSpace:
    """The user address space of a process (its ``mm->pgd``)."""
    mm = kernel.member(task.address, "task_struct", "mm")
    if not mm:
        raise VmiError(f"task {task.pid} ({task.comm}) is a kernel thread: it has no user address space")
    pgd = kernel.member(mm, "mm_struct", "pgd")
    return AddressSpace(X86_64Paging(kernel.phys, kernel.virt_to_phys(pgd), cr4=kernel.cr4, cache=kernel.cache))

def task(kernel: LinuxKernel, pid: int) -> Task:
    """The process with this pid; a clear error if there is none."""
    for t in tasks(kernel):
        if t.pid == pid:
            return t
    raise VmiError(f"no process with pid {pid} in the guest")

def cmdline(kernel: LinuxKernel, task: Task) -> list[str] | None:
    """A process's argv, read from its own stack (``mm->arg_start`` ..
    ``arg_end``) as ``/proc/PID/cmdline`` does; None for kernel threads
    and when those pages are not resident."""
    mm = kernel.member(task.address, "task_struct", "mm")
    if not mm:
        return None
    start = kernel.member(mm, "mm_struct", "arg_start")
    end = kernel.member(mm, "mm_struct", "arg_end")
    if not 0 < end - start <= 1 << 20:
        return None
    try:
        raw = process_address_space(kernel, task).read(start, end - start)
    except VmiError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")]

def state_letter(state: int, exit_state: int) -> str:
    """Like the kernel's ``task_state_index``: the highest reportable bit."""
    if state == TASK_IDLE:
        return "I"
    bits = (state | exit_state) & TASK_REPORT
    return _STATE_LETTERS[bits.bit_length()]




def per_cpu_offsets(kernel: LinuxKernel) -> list[int]:
    """``__per_cpu_offset[cpu]`` for every possible CPU (``nr_cpu_ids``):
    a per-CPU variable of CPU n lives at its symbol value plus entry n."""
    count = int.from_bytes(kernel.read(kernel.symbols["nr_cpu_ids"], 4), "little")
    if not 0 < count <= 8192:
        raise VmiError(f"nr_cpu_ids is {count}: not a kernel that has finished booting")
    table = kernel.read(kernel.symbols["__per_cpu_offset"], 8 * count)
    return [int.from_bytes(table[i : i + 8], "little") for i in range(0, 8 * count, 8)]


def current_tasks(kernel: LinuxKernel) -> dict[int, int]:
    """CPU number -> address of the task_struct running there (``current``):
    the per-CPU ``current_task`` (Linux <= 6.1) or ``pcpu_hot.current_task``."""
    if "current_task" in kernel.symbols:
        var = kernel.symbols["current_task"]
    else:
        var = kernel.symbols["pcpu_hot"] + kernel.btf.offsetof("pcpu_hot", "current_task")
    out = {}
    for cpu, offset in enumerate(per_cpu_offsets(kernel)):
        try:
            out[cpu] = kernel.u64((var + offset) & ((1 << 64) - 1))
        except VmiError:
            continue
    return out
