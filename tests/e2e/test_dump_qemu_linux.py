"""``vmscope dump`` of a Debian kernel under QEMU TCG (KASLR on), read back
by ``vmscope inspect --core`` (the same ps, lsmod and dmesg as the live
guest), by drgn (a kernel core it recognises, with kallsyms from the
VMCOREINFO note) and, where Debian's -dbg vmlinux is cached, by crash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.support import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

MODULES = ["crc32_generic", "nls_ascii"]


def vmscope(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmscope", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def inspect_json(*args: str) -> list[dict]:
    r = vmscope("inspect", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def guest():
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed")
    from vmscope.client.helpers.qemu_launch import QemuGuest
    from vmscope.images.linux import READY_MARKER, build_linux_guest

    image = build_linux_guest(mode="shell", modules=MODULES, quiet=True)
    with QemuGuest(str(image.vmlinuz), str(image.initramfs), free_port(), free_port(), memory_mib=256) as vm:
        vm.console.wait_for(READY_MARKER.encode())
        vm.console.run("sleep 600 & true")
        yield vm


@pytest.fixture(scope="module")
def dumped(guest, tmp_path_factory):
    """(live ps, lsmod, dmesg; the core's path; what vmscope dump said)."""
    live = {cmd: inspect_json("--gdb", guest.gdb, "--qmp", guest.qmp, cmd) for cmd in ("ps", "lsmod", "dmesg")}
    out = tmp_path_factory.mktemp("dump") / "guest.core"
    r = vmscope("dump", "--gdb", guest.gdb, "--qmp", guest.qmp, str(out))
    assert r.returncode == 0, r.stderr
    return live, out, r.stderr


def test_dump_says_what_it_wrote_and_the_guest_runs_on(guest, dumped):
    _, core, said = dumped
    assert "256 MiB of RAM" in said and "VMCOREINFO" in said and "the guest runs on" in said, said
    assert os.path.getsize(core) > 256 << 20
    assert "alive-7" in guest.console.run("echo alive-$((3 + 4))")


def test_inspect_core_gives_the_live_guests_ps_lsmod_and_dmesg(dumped):
    live, core, _ = dumped
    offline = {cmd: inspect_json("--core", str(core), cmd) for cmd in ("ps", "lsmod", "dmesg")}
    key = lambda rows: sorted((r["pid"], r["ppid"], r["comm"]) for r in rows)  # noqa: E731
    assert key(offline["ps"]) == key(live["ps"])
    assert any(r["comm"] == "sleep" for r in offline["ps"])
    assert offline["lsmod"] == live["lsmod"] and {r["name"] for r in offline["lsmod"]} >= set(MODULES)
    assert offline["dmesg"][: len(live["dmesg"])] == live["dmesg"]


def test_drgn_opens_the_dump_as_a_kernel_core_and_walks_the_same_tasks(dumped):
    """drgn finds the kernel by the VMCOREINFO note and its symbols through
    kallsyms (no vmlinux); it then walks init_task's list itself, at the
    member offsets BTF gives, through its own page-table walk of the dump."""
    pytest.importorskip("drgn")
    from vmscope.dump.offline import CoreInspector

    live, core, _ = dumped
    with CoreInspector(str(core)) as ins:
        btf = ins.kernel().btf
        offs = {m: btf.offsetof("task_struct", m) for m in ("tasks", "pid", "comm")}
    script = textwrap.dedent(f"""
        import drgn, json
        from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms
        prog = drgn.Program()
        prog.set_core_dump({str(core)!r})
        assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL, prog.flags
        prog.register_symbol_finder("kallsyms", load_vmlinux_kallsyms(prog), enable_index=0)
        banner = prog.read(prog.symbol("linux_banner").address, 64).split(b"\\0")[0].decode()
        head = prog.symbol("init_task").address + {offs['tasks']}
        node, tasks = prog.read_u64(head), []
        while node != head and len(tasks) < 10000:
            task = node - {offs['tasks']}
            tasks.append((prog.read_u32(task + {offs['pid']}),
                          prog.read(task + {offs['comm']}, 16).split(b"\\0")[0].decode()))
            node = prog.read_u64(node)
        print(json.dumps({{"banner": banner, "tasks": tasks}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["banner"].startswith("Linux version 6."), seen["banner"]
    ours = sorted((row["pid"], row["comm"]) for row in live["ps"] if row["pid"] != 0)
    assert sorted(map(tuple, seen["tasks"])) == ours


def test_crash_opens_the_dump_with_the_debug_vmlinux(dumped):
    """crash needs the kernel's DWARF (Debian's linux-image-*-dbg, 280 MB);
    run only where it is installed."""
    from vmscope.dump.offline import CoreInspector

    _, core, _ = dumped
    with CoreInspector(str(core)) as ins:
        release = ins.kernel().banner().split()[2]
    vmlinux = f"/usr/lib/debug/boot/vmlinux-{release}"
    if not shutil.which("crash") or not os.path.exists(vmlinux):
        pytest.skip(f"crash and {vmlinux} (package linux-image-{release}-dbg) are not installed")
    r = subprocess.run(["crash", "-s", vmlinux, str(core)], input="ps\nquit\n", capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "sleep" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
