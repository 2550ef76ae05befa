"""Run inside the lab's L1 (``python3 tests/lab/kvm_smoke.py``): prove that
/dev/kvm there is a working KVM, independent of vmscope's own KVM code.

x86_64: a VM with 64 KiB of RAM, three real-mode instructions at 0x1000
(``mov al, 0x42; out 0x10, al; hlt``); expect an I/O exit then HLT.
aarch64: four instructions at 0x10000 (``mov x1, #0x42; mov x2, #0x9000;
str x1, [x2]; b .``); expect an MMIO write of 0x42 to 0x9000.
Prints one JSON line with the API version and the exits seen.
"""

import ctypes
import fcntl
import json
import mmap
import os
import platform
import struct

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS, KVM_SET_REGS = 0x8090AE81, 0x4090AE82
KVM_GET_SREGS, KVM_SET_SREGS = 0x8138AE83, 0x4138AE84
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
CODE = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])  # mov al,0x42; out 0x10,al; hlt


KVM_ARM_VCPU_INIT, KVM_ARM_PREFERRED_TARGET = 0x4020AEAE, 0x8020AEAF
KVM_SET_ONE_REG = 0x4010AEAC
ARM64_PC = 0x6030000000100040  # KVM_REG_ARM64 | SIZE_U64 | ARM_CORE | offsetof(pc) / 4
KVM_EXIT_MMIO = 6
ARM64_CODE = struct.pack("<4I", 0xD2800841, 0xD2920002, 0xF9000041, 0x14000000)


def main_arm64() -> None:
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    report = {"api_version": fcntl.ioctl(kvm, KVM_GET_API_VERSION)}
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    report["vm_fd"] = vm
    mem = mmap.mmap(-1, 0x10000)
    mem[0:len(ARM64_CODE)] = ARM64_CODE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 0, 0, 0x10000, 0x10000, addr))
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    init = fcntl.ioctl(vm, KVM_ARM_PREFERRED_TARGET, bytes(32))
    fcntl.ioctl(vcpu, KVM_ARM_VCPU_INIT, init)
    pc = ctypes.c_uint64(0x10000)
    fcntl.ioctl(vcpu, KVM_SET_ONE_REG, struct.pack("<QQ", ARM64_PC, ctypes.addressof(pc)))
    run = mmap.mmap(vcpu, fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE)
    fcntl.ioctl(vcpu, KVM_RUN, 0)
    reason = struct.unpack_from("<I", run, 8)[0]
    if reason == KVM_EXIT_MMIO:
        phys, data, length, is_write = struct.unpack_from("<Q8sIB", run, 32)
        report["exits"] = [{"exit": "mmio", "write": bool(is_write), "addr": phys,
                            "value": int.from_bytes(data[:length], "little")}]
    else:
        report["exits"] = [{"exit": reason}]
    print(json.dumps(report))


def main() -> None:
    if platform.machine() == "aarch64":
        main_arm64()
        return
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    report = {"api_version": fcntl.ioctl(kvm, KVM_GET_API_VERSION)}
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    report["vm_fd"] = vm
    mem = mmap.mmap(-1, 0x10000)
    mem[0x1000:0x1000 + len(CODE)] = CODE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 0, 0, 0, 0x10000, addr))
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    sregs = bytearray(fcntl.ioctl(vcpu, KVM_GET_SREGS, bytes(312)))
    struct.pack_into("<Q", sregs, 0, 0)  # cs.base = 0
    struct.pack_into("<H", sregs, 12, 0)  # cs.selector = 0
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(fcntl.ioctl(vcpu, KVM_GET_REGS, bytes(144)))
    struct.pack_into("<QQ", regs, 128, 0x1000, 0x2)  # rip, rflags
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
    exits = []
    for _ in range(4):
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        reason = struct.unpack_from("<I", run, 8)[0]
        if reason == KVM_EXIT_IO:
            direction, size, port, count, offset = struct.unpack_from("<BBHIQ", run, 32)
            exits.append({"exit": "io", "out": direction == 1, "port": port,
                          "value": run[offset]})
        elif reason == KVM_EXIT_HLT:
            exits.append({"exit": "hlt"})
            break
        else:
            exits.append({"exit": reason})
            break
    regs = fcntl.ioctl(vcpu, KVM_GET_REGS, bytes(144))
    report["exits"] = exits
    report["rip"] = struct.unpack_from("<Q", regs, 128)[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
