"""The slice of the KVM userspace ABI that vmscope's VMM uses, in ctypes.

Numbers and layouts follow ``<linux/kvm.h>`` and ``<asm/kvm.h>`` for
x86_64. Ioctls go through libc's ``ioctl`` via ctypes rather than
``fcntl.ioctl`` because ctypes releases the GIL for the call: a vCPU thread
blocked in ``KVM_RUN`` must not stop the GDB stub or the other vCPUs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


class KvmIoctlError(OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed; names the request."""


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAE << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, struct) -> int:
    return _ioc(1, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct) -> int:
    return _ioc(2, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct) -> int:
    return _ioc(3, nr, ctypes.sizeof(struct))


def ioctl(fd: int, request: int, arg=0, name: str = "") -> int:
    """ioctl(2) with the GIL released; ``arg`` is an int or a ctypes object.

    Raises :class:`KvmIoctlError` (an OSError with errno) on failure.
    """
    if isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.cast(ctypes.byref(arg), ctypes.c_void_p)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmIoctlError(err, f"{name or hex(request)}: {os.strerror(err)}")
    return ret


# --- structures -------------------------------------------------------------


class KvmRegs(ctypes.Structure):
    _fields_ = [(n, u64) for n in (
        "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
    )]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
        ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
        ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = (
        [(n, KvmSegment) for n in "cs ds es fs gs ss tr ldt".split()]
        + [("gdt", KvmDtable), ("idt", KvmDtable)]
        + [(n, u64) for n in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()]
        + [("interrupt_bitmap", u64 * 4)]
    )


class KvmFpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
        ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
        ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32),
    ]


class KvmTranslation(ctypes.Structure):
    _fields_ = [
        ("linear_address", u64), ("physical_address", u64), ("valid", u8),
        ("writeable", u8), ("usermode", u8), ("pad", u8 * 5),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
        ("memory_size", u64), ("userspace_addr", u64),
    ]


class KvmGuestDebug(ctypes.Structure):
    _fields_ = [("control", u32), ("pad", u32), ("debugreg", u64 * 8)]


class _Exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _Interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _Nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _Smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = [
        ("exception", _Exception), ("interrupt", _Interrupt), ("nmi", _Nmi),
        ("sipi_vector", u32), ("flags", u32), ("smi", _Smi),
        ("triple_fault_pending", u8), ("reserved", u8 * 26),
        ("exception_has_payload", u8), ("exception_payload", u64),
    ]


class KvmXcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class KvmXcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * 16), ("padding", u64 * 16)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
        ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_struct(nent: int):
    """A ``struct kvm_cpuid2`` with room for ``nent`` entries."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * nent)]

    return KvmCpuid2


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


def msrs_struct(nmsrs: int):
    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * nmsrs)]

    return KvmMsrs


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmEnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class KvmMsrFilterRange(ctypes.Structure):
    """One range of ``struct kvm_msr_filter``: a bitmap bit of 1 lets the
    guest access the MSR (for the operations in ``flags``), 0 denies it,
    which exits to user space when KVM_MSR_EXIT_REASON_FILTER is on."""

    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", ctypes.c_void_p)]


class KvmMsrFilter(ctypes.Structure):
    _fields_ = [("flags", u32), ("ranges", KvmMsrFilterRange * 16)]


# kvm_run and its exit union (offset 32) --------------------------------------


class ExitIo(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class ExitMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class ExitDebug(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class ExitFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class ExitInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class ExitEmulationFailure(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("flags", u64), ("insn_size", u8), ("insn_bytes", u8 * 15)]


class ExitMsr(ctypes.Structure):
    """KVM_EXIT_X86_RDMSR/WRMSR: ``error`` is ours to set (1 = inject #GP)."""

    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class ExitSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class ExitUnion(ctypes.Union):
    _fields_ = [
        ("io", ExitIo), ("mmio", ExitMmio), ("debug", ExitDebug),
        ("fail_entry", ExitFailEntry), ("internal", ExitInternal),
        ("emulation_failure", ExitEmulationFailure),
        ("system_event", ExitSystemEvent), ("msr", ExitMsr), ("padding", u8 * 256),
    ]


class KvmRun(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
        ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
        ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", ExitUnion),
    ]


# --- ioctl numbers ------------------------------------------------------------

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, KvmCpuid2Header)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, u64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_CREATE_PIT2 = _iow(0x77, KvmPitConfig)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)
KVM_TRANSLATE = _iowr(0x85, KvmTranslation)
KVM_GET_MSRS = _iowr(0x88, KvmCpuid2Header)  # struct kvm_msrs header is 8 bytes too
KVM_SET_MSRS = _iow(0x89, KvmCpuid2Header)
KVM_KVMCLOCK_CTRL = _io(0xAD)  # vCPU: set kvmclock's PVCLOCK_GUEST_STOPPED at the next entry
KVM_GET_FPU = _ior(0x8C, KvmFpu)
KVM_SET_FPU = _iow(0x8D, KvmFpu)
KVM_SET_CPUID2 = _iow(0x90, KvmCpuid2Header)
KVM_GET_XCRS = _ior(0xA6, KvmXcrs)
KVM_GET_MP_STATE = _ior(0x98, KvmMpState)
KVM_SET_MP_STATE = _iow(0x99, KvmMpState)
KVM_SET_GUEST_DEBUG = _iow(0x9B, KvmGuestDebug)
KVM_GET_VCPU_EVENTS = _ior(0x9F, KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, KvmVcpuEvents)
KVM_ENABLE_CAP = _iow(0xA3, KvmEnableCap)
KVM_X86_SET_MSR_FILTER = _iow(0xC6, KvmMsrFilter)

# capabilities
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_READONLY_MEM = 81
KVM_CAP_SET_GUEST_DEBUG2 = 195  # returns the KVM_GUESTDBG_* flags this KVM accepts
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189

# KVM_CAP_X86_USER_SPACE_MSR: which failed MSR accesses exit to user space
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
# struct kvm_msr_filter(_range) flags
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1

# memory-slot flags
KVM_MEM_READONLY = 2

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

EXIT_NAMES = {v: k[len("KVM_EXIT_"):] for k, v in globals().items() if k.startswith("KVM_EXIT_")}

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

# guest debug control
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000
KVM_GUESTDBG_INJECT_DB = 0x40000
KVM_GUESTDBG_INJECT_BP = 0x80000
KVM_GUESTDBG_BLOCKIRQ = 0x100000

# vcpu events flags
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4

# mp states
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmFpu) == 416
assert ctypes.sizeof(KvmTranslation) == 24
assert ctypes.sizeof(KvmGuestDebug) == 72
assert ctypes.sizeof(KvmVcpuEvents) == 64
assert ctypes.sizeof(KvmUserspaceMemoryRegion) == 32
assert ctypes.sizeof(ExitUnion) == 256
assert ctypes.sizeof(KvmEnableCap) == 104
assert ctypes.sizeof(KvmMsrFilter) == 392
