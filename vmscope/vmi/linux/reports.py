"""What ``vmscope inspect`` and ``vmscope fleet`` print, as rows of plain data.

One place builds the ``ps``, ``lsmod`` and ``dmesg`` records from a
:class:`~vmscope.vmi.linux.kernel.LinuxKernel`, so a live guest, a core
file and a fleet of both give the same fields.
"""

from __future__ import annotations


def ps_rows(kernel, threads: bool = False, full: bool = False) -> list[dict]:
    tasks = kernel.tasks(threads=threads)
    rows = [{"pid": t.pid, "tgid": t.tgid, "ppid": t.ppid, "state": t.state, "kind": t.kind, "cpu": t.cpu,
             "comm": t.comm, "task_struct": hex(t.address)} for t in tasks]
    if full:
        for r, t in zip(rows, tasks):
            r["cmdline"] = kernel.cmdline(t) if not t.kernel_thread else None
    return rows


def lsmod_rows(kernel) -> list[dict]:
    return [{"name": m.name, "size": m.size, "refcount": m.refcount, "used_by": list(m.used_by), "state": m.state,
             "base": hex(m.base)} for m in kernel.modules()]


def dmesg_rows(kernel, lines: int = 0) -> list[dict]:
    recs = kernel.dmesg()
    if lines > 0:
        recs = recs[-lines:]
    return [{"seq": r.seq, "time": r.timestamp_ns / 1e9, "level": r.level, "text": r.text} for r in recs]
