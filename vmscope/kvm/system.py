"""KVM itself, whatever the architecture: opening ``/dev/kvm``, checking
the capabilities a machine needs, and the signal that kicks a vCPU thread
out of ``KVM_RUN``.

Why one module: the x86 and arm64 machines (and the debug-capability probe)
need the same checks with the same readable errors, and one kick handler
serves every machine of the process.
"""

from __future__ import annotations

import os
import signal
import threading

from vmscope.kvm.abi import KVM_CHECK_EXTENSION, KVM_CREATE_VM, KVM_GET_API_VERSION, ioctl
from vmscope.machine import MachineUnavailable

KVM_DEVICE = "/dev/kvm"
#: the signal that makes a vCPU thread's KVM_RUN return EINTR
KICK_SIGNAL = signal.SIGRTMIN + 2


def install_kick_handler() -> None:
    """The kick signal needs a handler (the default action would kill the
    process); the handler does nothing, its only job is to make KVM_RUN
    return EINTR. Python only lets the main thread install handlers."""
    current = signal.getsignal(KICK_SIGNAL)
    if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise MachineUnavailable(
            "the first KVM machine must be created in the main thread "
            f"(it installs the vCPU kick handler for signal {int(KICK_SIGNAL)})"
        )
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


def open_kvm(path: str = KVM_DEVICE, missing_hint: str = "load kvm-intel/kvm-amd, or use the emulated target") -> int:
    """Open /dev/kvm and check the API version; MachineUnavailable says why
    not (``missing_hint`` tells the user what to do when there is no KVM)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MachineUnavailable(f"{path} does not exist: this host has no KVM ({missing_hint})") from None
    except PermissionError:
        raise MachineUnavailable(f"{path}: permission denied (add your user to the 'kvm' group)") from None
    except OSError as e:
        raise MachineUnavailable(f"{path}: cannot open: {e.strerror}") from None
    try:
        version = ioctl(fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    except OSError as e:
        os.close(fd)
        raise MachineUnavailable(f"{path}: not a KVM device ({e})") from None
    if version != 12:
        os.close(fd)
        raise MachineUnavailable(f"{path}: KVM API version {version}, vmscope needs 12")
    return fd


def check_extension(fd: int, cap: int) -> int:
    """KVM_CHECK_EXTENSION on the system or VM fd ``fd``: 0 when absent."""
    return max(0, ioctl(fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION"))


def require_capabilities(kvm_fd: int, needed: tuple[tuple[int, str], ...]) -> None:
    """MachineUnavailable naming the first capability of ``needed``
    ((number, what it is) pairs) this KVM lacks."""
    for cap, what in needed:
        if check_extension(kvm_fd, cap) <= 0:
            raise MachineUnavailable(f"{KVM_DEVICE} lacks the {what} capability vmscope needs")


def create_vm(kvm_fd: int, machine_type: int = 0) -> int:
    try:
        return ioctl(kvm_fd, KVM_CREATE_VM, machine_type, "KVM_CREATE_VM")
    except OSError as e:
        raise MachineUnavailable(f"{KVM_DEVICE}: cannot create a VM: {e}") from None
