"""The arm64 guest's device tree, decoded back with libfdt and with dtc
(Debian's device-tree-compiler), node by node; no KVM."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from vmscope.kvm.arm64.fdt import DeviceTreeSpec, build_fdt

libfdt = pytest.importorskip("libfdt", reason="pylibfdt is a dependency: pip install -e .")

SPEC = dict(ram_base=0x4000_0000, ram_size=512 << 20, mpidrs=[0, 1],
            uart_base=0x0900_0000, uart_size=0x1000, uart_spi=1,
            bootargs="console=ttyS0 quiet panic=-1", initrd=(0x5E00_0000, 0x5E0F_4240),
            kaslr_seed=0x1122_3344_5566_7788, rng_seed=bytes(range(64)))
V3 = dict(gic_version=3, gic_regs=[(0x0800_0000, 0x1_0000), (0x080A_0000, 0x4_0000)])
V2 = dict(gic_version=2, gic_regs=[(0x0800_0000, 0x1000), (0x0801_0000, 0x2000)])


class Tree:
    """Lookup helpers over libfdt's Fdt."""

    def __init__(self, blob: bytes):
        self.fdt = libfdt.Fdt(blob)

    def node(self, path: str) -> int:
        return self.fdt.path_offset(path)

    def prop(self, path: str, name: str) -> bytes:
        return bytes(self.fdt.getprop(self.node(path), name))

    def string(self, path: str, name: str) -> str:
        return self.fdt.getprop(self.node(path), name).as_str()

    def strings(self, path: str, name: str) -> list[str]:
        return self.prop(path, name).rstrip(b"\0").decode().split("\0")

    def cells(self, path: str, name: str) -> list[int]:
        raw = self.prop(path, name)
        return list(struct.unpack(f">{len(raw) // 4}I", raw))

    def u64s(self, path: str, name: str) -> list[int]:
        raw = self.prop(path, name)
        return list(struct.unpack(f">{len(raw) // 8}Q", raw))

    def has(self, path: str, name: str) -> bool:
        return not isinstance(self.fdt.getprop(self.node(path), name, quiet=(libfdt.NOTFOUND,)), int)

    def children(self, path: str) -> list[str]:
        out, off = [], self.fdt.first_subnode(self.node(path), quiet=(libfdt.NOTFOUND,))
        while off >= 0:
            out.append(self.fdt.get_name(off))
            off = self.fdt.next_subnode(off, quiet=(libfdt.NOTFOUND,))
        return out


def test_every_node_of_the_gicv3_tree():
    t = Tree(build_fdt(DeviceTreeSpec(**SPEC, **V3)))
    assert sorted(t.children("/")) == sorted(["chosen", "memory@40000000", "cpus", "psci", "intc@8000000",
                                              "timer", "uart@9000000"])
    assert t.cells("/", "#address-cells") == [2] and t.cells("/", "#size-cells") == [2]
    gic_phandle = t.cells("/intc@8000000", "phandle")[0]
    assert t.cells("/", "interrupt-parent") == [gic_phandle]

    assert t.string("/chosen", "bootargs") == "console=ttyS0 quiet panic=-1"
    assert t.string("/chosen", "stdout-path") == "/uart@9000000"
    assert t.u64s("/chosen", "linux,initrd-start") == [0x5E00_0000]
    assert t.u64s("/chosen", "linux,initrd-end") == [0x5E0F_4240]
    assert t.u64s("/chosen", "kaslr-seed") == [0x1122_3344_5566_7788]
    assert t.prop("/chosen", "rng-seed") == bytes(range(64))

    assert t.string("/memory@40000000", "device_type") == "memory"
    assert t.u64s("/memory@40000000", "reg") == [0x4000_0000, 512 << 20]

    assert t.cells("/cpus", "#address-cells") == [1] and t.cells("/cpus", "#size-cells") == [0]
    assert t.children("/cpus") == ["cpu@0", "cpu@1"]
    for i in (0, 1):
        cpu = f"/cpus/cpu@{i}"
        assert t.cells(cpu, "reg") == [i]
        assert t.string(cpu, "device_type") == "cpu"
        assert t.string(cpu, "enable-method") == "psci"

    assert "arm,psci-0.2" in t.strings("/psci", "compatible")
    assert t.string("/psci", "method") == "hvc"

    gic = "/intc@8000000"
    assert t.string(gic, "compatible") == "arm,gic-v3"
    assert t.has(gic, "interrupt-controller") and t.cells(gic, "#interrupt-cells") == [3]
    assert t.u64s(gic, "reg") == [0x0800_0000, 0x1_0000, 0x080A_0000, 0x4_0000]

    assert t.string("/timer", "compatible") == "arm,armv8-timer"
    irqs = t.cells("/timer", "interrupts")
    assert [tuple(irqs[i:i + 3]) for i in range(0, 12, 3)] == [(1, 13, 4), (1, 14, 4), (1, 11, 4), (1, 10, 4)]

    uart = "/uart@9000000"
    assert t.string(uart, "compatible") == "ns16550a"
    assert t.u64s(uart, "reg") == [0x0900_0000, 0x1000]
    assert t.cells(uart, "interrupts") == [0, 1, 4]  # SPI 1, level high
    assert t.cells(uart, "clock-frequency") == [1_843_200]


def test_gicv2_tree_and_optional_rtc():
    t = Tree(build_fdt(DeviceTreeSpec(**SPEC, **V2, rtc=(0x0901_0000, 0x1000, 2))))
    gic = "/intc@8000000"
    assert t.string(gic, "compatible") == "arm,cortex-a15-gic"
    assert t.u64s(gic, "reg") == [0x0800_0000, 0x1000, 0x0801_0000, 0x2000]
    # GICv2 PPI specifiers name the CPUs they go to (bits 8-15): 2 vCPUs
    assert t.cells("/timer", "interrupts")[2] == 0x304
    assert t.strings("/rtc@9010000", "compatible") == ["arm,pl031", "arm,primecell"]
    assert t.cells("/rtc@9010000", "interrupts") == [0, 2, 4]


def test_no_initrd_no_initrd_properties_and_fresh_seeds():
    spec = {k: v for k, v in SPEC.items() if k not in ("initrd", "kaslr_seed", "rng_seed")}
    a, b = (Tree(build_fdt(DeviceTreeSpec(**spec, **V3))) for _ in range(2))
    assert not a.has("/chosen", "linux,initrd-start") and not a.has("/chosen", "linux,initrd-end")
    assert a.prop("/chosen", "kaslr-seed") != b.prop("/chosen", "kaslr-seed")
    assert len(a.prop("/chosen", "rng-seed")) == 64


def test_dtc_reads_it_without_complaint(tmp_path):
    dtc = shutil.which("dtc")
    if dtc is None:
        pytest.fail("dtc is not installed (./dev.sh setup installs device-tree-compiler)")
    blob = tmp_path / "vm.dtb"
    blob.write_bytes(build_fdt(DeviceTreeSpec(**SPEC, **V3)))
    r = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(blob)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # no warnings: every binding is as dtc's checks expect
    assert 'compatible = "arm,gic-v3";' in r.stdout and 'enable-method = "psci";' in r.stdout
