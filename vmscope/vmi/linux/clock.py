"""Time since boot from the timekeeper in guest memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmscope.vmi.linux.kernel import LinuxKernel


def uptime(kernel: LinuxKernel) -> float:
    """Seconds since boot (CLOCK_BOOTTIME) as of the timekeeper's last
    update. The clock source itself cannot be read from memory, so an
    idle tickless guest may be a fraction of a second (or, long idle,
    more) ahead of this value."""
    tk_core = kernel.symbols["tk_core"]
    btf = kernel.btf
    # static struct { seqcount_raw_spinlock_t seq; struct timekeeper timekeeper; } tk_core
    seq_size = btf.sizeof(btf.find("seqcount_raw_spinlock_t", 8)) if btf.has("seqcount_raw_spinlock_t", 8) else 4
    tk = tk_core + ((seq_size + 7) & ~7)
    # ktime_get() = tkr_mono.base + (cycles since cycle_last * mult + xtime_nsec) >> shift
    base = kernel.member(tk, "timekeeper", "tkr_mono.base")
    frac = kernel.member(tk, "timekeeper", "tkr_mono.xtime_nsec") >> kernel.member(tk, "timekeeper", "tkr_mono.shift")
    boot = kernel.member(tk, "timekeeper", "offs_boot")
    return (base + frac + boot) / 1e9
