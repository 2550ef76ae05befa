"""``vmscope inspect`` against a real Debian cloud kernel under
``qemu-system-x86_64 -accel tcg`` with ``-gdb`` and QMP, KASLR on, no
vmlinux: what it prints must match what the guest says about itself on its
serial console (busybox ``ps``, ``/proc/modules``, ``dmesg``,
``/proc/kallsyms``)."""

from __future__ import annotations

import json
import re
import shutil
import uuid

import pytest

from tests.support import free_port, guest_ps

from vmscope.client.helpers.qemu_launch import QemuGuest
from vmscope.client.inspect_cli import main as inspect_main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GDB_PORT, QMP_PORT = free_port(), free_port()  # free now: no clash with a parallel run
MODULES = ["irqbypass", "crc32_generic", "nls_ascii", "async_xor"]  # async_xor pulls in xor and async_tx
LOADED = sorted(MODULES + ["xor", "async_tx"])


THREADS_C = r"""
#include <pthread.h>
#include <unistd.h>
static void *worker(void *arg) { (void)arg; for (;;) pause(); return 0; }
int main(void) {
    pthread_t t[3];
    for (int i = 0; i < 3; i++) pthread_create(&t[i], 0, worker, 0);
    for (;;) pause();
}
"""


@pytest.fixture(scope="module")
def threads_program(tmp_path_factory):
    """A static program with three extra threads, to run inside the guest."""
    import subprocess

    d = tmp_path_factory.mktemp("threads")
    (d / "threads.c").write_text(THREADS_C)
    subprocess.run(["gcc", "-static", "-pthread", "-O2", "-o", str(d / "threads"), str(d / "threads.c")], check=True)
    return d / "threads"


@pytest.fixture(scope="module")
def guest(threads_program, tmp_path_factory):
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed")
    from vmscope.images.linux import READY_MARKER, build_linux_guest

    image = build_linux_guest(mode="shell", modules=MODULES, quiet=True, files={"/bin/threads": threads_program})
    # KASLR stays on: no nokaslr on the command line.
    with QemuGuest(str(image.vmlinuz), str(image.initramfs), GDB_PORT, QMP_PORT) as vm:
        vm.console.wait_for(READY_MARKER.encode())
        vm.console.run("true")  # the shell is up
        yield vm.proc, vm.console


@pytest.fixture(scope="module")
def facts(guest):
    """What the guest says about itself, taken while it runs, before we attach."""
    _, con = guest
    out = {}
    con.run("chmod +x /bin/threads; /bin/threads & sleep 1")
    out["threads"] = con.run("for t in /proc/$(pidof threads)/task/*; do echo tid ${t##*/}; done")
    out["ps"] = con.run("ps -o pid,ppid,comm")
    out["modules"] = con.run("cat /proc/modules")
    marker = f"vmscope-test-{uuid.uuid4().hex[:8]}"
    con.run(f"echo {marker} > /dev/kmsg")
    out["marker"] = marker
    out["dmesg"] = con.run("dmesg | tail -n 5")
    out["kallsyms"] = con.run("grep -w -e init_task -e _text -e linux_banner /proc/kallsyms")
    out["mapsyms"] = con.run("grep -w -e _text -e init_task -e init_top_pgt -e __start_BTF -e modules "
                             "-e prb /proc/kallsyms")
    out["uptime"] = con.run("cat /proc/uptime")
    out["cmdlines"] = con.run("for p in 1 $$; do echo \"$p:$(tr '\\0' ' ' < /proc/$p/cmdline)\"; done")
    return out


def run_inspect(capsys, *args: str) -> str:
    rc = inspect_main(["--gdb", f"127.0.0.1:{GDB_PORT}", "--qmp", f"127.0.0.1:{QMP_PORT}", *args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def test_ps_matches_the_guests_own_ps(guest, facts, capsys):
    ours = {r["pid"]: r for r in json.loads(run_inspect(capsys, "--json", "ps"))}
    theirs = guest_ps(facts["ps"])
    assert len(theirs) > 20, facts["ps"]
    ps_pid = max(pid for pid, (_, comm) in theirs.items() if comm == "ps")
    for pid, (ppid, comm) in theirs.items():
        if pid == ps_pid or comm.startswith("kworker"):
            continue  # ps itself has exited; kworkers come and go
        assert pid in ours, f"guest has pid {pid} ({comm}), vmscope does not"
        assert ours[pid]["comm"] == comm and ours[pid]["ppid"] == ppid
    for pid, row in ours.items():
        if pid and not row["comm"].startswith("kworker"):
            assert pid in theirs, f"vmscope lists pid {pid} ({row['comm']}) that the guest's ps did not"
    assert ours[0]["comm"] == "swapper/0" and ours[1]["kind"] == "user" and ours[2]["kind"] == "kernel"
    # busybox shows a kworker's workqueue after a dash; the task name is the prefix.
    for pid, (ppid, comm) in theirs.items():
        if comm.startswith("kworker") and pid in ours:
            assert comm.startswith(ours[pid]["comm"])


def test_lsmod_matches_proc_modules(guest, facts, capsys):
    ours = json.loads(run_inspect(capsys, "--json", "lsmod"))
    theirs = [line.split() for line in facts["modules"].splitlines() if line.strip()]
    assert sorted(m[0] for m in theirs) == LOADED
    assert [(m["name"], m["size"], m["refcount"], m["state"], m["base"]) for m in ours] == \
           [(t[0], int(t[1]), int(t[2]), t[4], t[5]) for t in theirs]
    # Fourth column: who uses each module ("async_xor," or "-").
    assert [sorted(m["used_by"]) for m in ours] == \
           [sorted(x for x in t[3].split(",") if x and x != "-") for t in theirs]
    assert any(m["used_by"] for m in ours)


def test_dmesg_has_the_guests_last_lines(guest, facts, capsys):
    ours = run_inspect(capsys, "dmesg").splitlines()
    theirs = [line for line in facts["dmesg"].splitlines() if line.startswith("[")]
    assert any(facts["marker"] in line for line in theirs)
    for line in theirs:
        assert line in ours, f"guest's dmesg line missing from ours: {line!r}"


def test_symbols_and_kaslr_match_proc_kallsyms(guest, facts, capsys):
    theirs = {parts[2]: int(parts[0], 16) for parts in (l.split() for l in facts["kallsyms"].splitlines())
              if len(parts) == 3}
    assert set(theirs) >= {"init_task", "_text", "linux_banner"}
    ours = {r["name"]: int(r["address"], 16) for r in json.loads(run_inspect(capsys, "--json", "symbols",
                                                                           "^(init_task|_text|linux_banner)$"))}
    assert ours == theirs
    info = json.loads(run_inspect(capsys, "--json", "info"))
    assert int(info["text"], 16) == theirs["_text"]
    assert int(info["kaslr_slide"], 16) == theirs["_text"] - 0xFFFFFFFF81000000
    assert info["banner"].startswith("Linux version 6.") and info["memory_path"] == "qemu-shared-ram"


def test_symbol_file_gives_gdb_the_kernels_symbols(guest, facts, capsys, tmp_path):
    """`inspect symbols --elf` writes kallsyms as an ELF; stock gdb attached
    to QEMU's own stub loads it and names kernel addresses (KASLR on)."""
    from tests.support import Gdb

    theirs = {parts[2]: int(parts[0], 16) for parts in (l.split() for l in facts["kallsyms"].splitlines())
              if len(parts) == 3}
    elf = tmp_path / "kallsyms.elf"
    run_inspect(capsys, "symbols", "--elf", str(elf))
    gdb = Gdb(None, timeout=120)
    try:
        gdb.cmd(f"target remote 127.0.0.1:{GDB_PORT}")
        loaded = gdb.cmd(f"add-symbol-file {elf}")
        assert "Reading symbols" in loaded, loaded
        assert gdb.value("(long)&init_task") & (2**64 - 1) == theirs["init_task"]
        assert "Linux version 6." in gdb.cmd("x/s &linux_banner")
        assert gdb.cmd(f"info symbol {theirs['init_task'] + 8:#x}").startswith("init_task + 8 in section .data")
        gdb.cmd("detach")
    finally:
        gdb.close()


def test_regs_show_cr3_and_efer(guest, facts, capsys):
    regs = json.loads(run_inspect(capsys, "--json", "regs"))
    efer = int(regs["efer"], 16)
    assert efer & 0x500 == 0x500  # long mode enabled and active
    assert int(regs["cr3"], 16) & ~0xFFF and int(regs["cr0"], 16) & 0x80000001 == 0x80000001
    text = run_inspect(capsys, "regs")
    assert re.search(r"cr3\s+0x[0-9a-f]{16}", text) and re.search(r"efer\s+0x[0-9a-f]{16}", text)


def test_uptime_agrees_with_proc_uptime(guest, facts, capsys):
    """Ours is the timekeeper as of its last tick, read later than the
    guest's /proc/uptime: a tickless idle guest may lag a little, never
    by more than it ran; both bounds are loose on purpose."""
    ours = float(run_inspect(capsys, "uptime"))
    theirs = float(facts["uptime"].split()[0])
    assert theirs - 30 < ours < theirs + 600


def test_translate_and_read_through_the_kernel_page_tables(guest, facts, capsys):
    text_addr = json.loads(run_inspect(capsys, "--json", "info"))["text"]
    tr = json.loads(run_inspect(capsys, "--json", "translate", text_addr))
    assert tr["page_size"] in (2 << 20, 4096) and not tr["user"]
    virt = run_inspect(capsys, "--json", "read", text_addr, "64")
    phys = run_inspect(capsys, "--json", "read", "--physical", tr["physical"], "64")
    assert json.loads(virt)["data"] == json.loads(phys)["data"] != "00" * 64


def test_unmapped_address_names_address_and_level(guest, facts, capsys):
    rc = inspect_main(["--gdb", f"127.0.0.1:{GDB_PORT}", "--qmp", f"127.0.0.1:{QMP_PORT}",
                       "translate", "0x1234000"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "0x1234000" in err and re.search(r"not present at (PML4|PDPT|PD|PT)", err)


def test_rsp_only_memory_gives_the_same_ps(guest, facts, capsys):
    """The slow path (physical reads over RSP, no shared RAM) agrees."""
    shared = json.loads(run_inspect(capsys, "--json", "ps"))
    rsp = json.loads(run_inspect(capsys, "--memory", "rsp", "--json", "ps"))
    assert [(r["pid"], r["comm"]) for r in rsp] == [(r["pid"], r["comm"]) for r in shared]


def test_drgn_program_over_the_same_memory(guest, facts, capsys):
    pytest.importorskip("drgn", reason="drgn is optional (pip install drgn)")
    out = run_inspect(capsys, "drgn", "-c",
                      "s = prog.symbol('init_task'); print(hex(s.address)); "
                      "print(prog.read(prog.symbol('linux_banner').address, 13).decode())")
    banner = out.splitlines()[1]
    theirs = {parts[2]: int(parts[0], 16) for parts in (l.split() for l in facts["kallsyms"].splitlines())
              if len(parts) == 3}
    assert int(out.split()[0], 16) == theirs["init_task"]
    assert banner == "Linux version"


def test_client_retries_around_unmapped_pages_on_real_qemu(guest, facts, capsys):
    """QEMU fails a whole ``m`` that touches one unmapped byte (E14); the
    client must return the mapped part and name the hole exactly."""
    from vmscope.client import Client, MemoryReadError

    info = json.loads(run_inspect(capsys, "--json", "info"))
    with Client.connect(f"127.0.0.1:{GDB_PORT}") as c:
        # The kernel image mapping ends at a 2 MiB boundary; the next page is unmapped.
        from vmscope.vmi.linux.kernel import find_kernel_image
        from vmscope.client.helpers.qemu import QemuMonitor

        qmp = QemuMonitor(f"127.0.0.1:{QMP_PORT}")
        regs = c.registers()
        loc = find_kernel_image(qmp.shared_ram(), regs["cr3"], regs["cr4"])
        qmp.close()
        start = loc.end - 3000
        data, holes = c.read_memory_partial(start, 6000)
        assert holes == [(loc.end, 3000)]
        assert data[:3000] == c.read_memory(start, 3000)
        with pytest.raises(MemoryReadError, match=f"0x{loc.end:x}"):
            c.read_memory(start, 6000)
        assert int(info["text"], 16) == loc.text
        c.detach()


def test_qmp_only_inspection_pauses_and_resumes_the_guest(guest, facts, capsys):
    """Without a GDB stub: registers from ``info registers``, memory from
    shared RAM; the guest is stopped for the look and running afterwards."""
    from vmscope.client.helpers.qemu import QemuMonitor

    rc = inspect_main(["--qmp", f"127.0.0.1:{QMP_PORT}", "--json", "lsmod"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert sorted(m["name"] for m in json.loads(out.out)) == LOADED
    qmp = QemuMonitor(f"127.0.0.1:{QMP_PORT}")
    try:
        assert qmp.command("query-status")["running"]
    finally:
        qmp.close()


def test_symbol_cache_gives_the_same_answers(guest, facts, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VMSCOPE_CACHE", str(tmp_path))
    fresh = json.loads(run_inspect(capsys, "--json", "ps"))
    files = list((tmp_path / "kernels").glob("*.pickle"))
    assert len(files) == 1
    cached = json.loads(run_inspect(capsys, "--json", "ps"))
    assert [(r["pid"], r["comm"]) for r in cached] == [(r["pid"], r["comm"]) for r in fresh]
    files[0].write_bytes(b"garbage")  # a damaged cache is ignored, not trusted
    again = json.loads(run_inspect(capsys, "--json", "symbols", "^init_task$"))
    theirs = {parts[2]: int(parts[0], 16) for parts in (l.split() for l in facts["kallsyms"].splitlines())
              if len(parts) == 3}
    assert int(again[0]["address"], 16) == theirs["init_task"]


def test_ps_full_shows_each_processes_own_argv(guest, facts, capsys):
    """Command lines come from each process's stack, through its own page tables."""
    theirs = {}
    for line in facts["cmdlines"].splitlines():
        pid, sep, args = line.partition(":")
        if sep and pid.strip().isdigit():
            theirs[int(pid)] = args.split()
    assert len(theirs) == 2 and theirs[1], facts["cmdlines"]
    ours = {r["pid"]: r for r in json.loads(run_inspect(capsys, "--json", "ps", "--full"))}
    for pid, argv in theirs.items():
        assert ours[pid]["cmdline"] == argv
    assert ours[2]["cmdline"] is None  # kthreadd: no user memory


def test_a_users_system_map_is_slid_to_the_running_kernel(guest, facts, capsys, tmp_path):
    """With --system-map, symbols come from the file (link-time addresses,
    as Debian's -dbg package ships them) moved by the detected KASLR slide."""
    rows = [l.split() for l in facts["mapsyms"].splitlines() if len(l.split()) == 3]
    assert {r[2] for r in rows} >= {"_text", "init_task", "init_top_pgt", "__start_BTF"}
    live = {r[2]: int(r[0], 16) for r in rows}
    slide = live["_text"] - 0xFFFFFFFF81000000
    system_map = tmp_path / "System.map"
    system_map.write_text("".join(f"{int(a, 16) - slide:016x} {t} {n}\n" for a, t, n in rows))
    ours = json.loads(run_inspect(capsys, "--system-map", str(system_map), "--json", "symbols", "."))
    assert {r["name"]: int(r["address"], 16) for r in ours} == live
    ps = json.loads(run_inspect(capsys, "--system-map", str(system_map), "--json", "ps"))
    assert ps[1]["comm"] == "init"
    bad = tmp_path / "placeholder.map"
    bad.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    rc = inspect_main(["--gdb", f"127.0.0.1:{GDB_PORT}", "--qmp", f"127.0.0.1:{QMP_PORT}",
                       "--system-map", str(bad), "ps"])
    assert rc == 1 and "no _text symbol" in capsys.readouterr().err


def test_ps_marks_the_task_running_on_the_cpu(guest, facts, capsys):
    """``current`` comes from the per-CPU area; on x86_64 the kernel's
    gs_base is that area's offset, a cross-check through the registers."""
    from vmscope.client.session import Inspector
    from vmscope.vmi.linux.tasks import per_cpu_offsets

    with Inspector(f"127.0.0.1:{GDB_PORT}", f"127.0.0.1:{QMP_PORT}") as ins:
        kernel = ins.kernel()
        regs = ins.registers()
        assert per_cpu_offsets(kernel)[0] in (regs["gs_base"], regs["k_gs_base"])
        running = [t for t in kernel.tasks() if t.cpu is not None]
    assert [t.cpu for t in running] == [0]  # one vCPU, one current task (often swapper/0: idle)


def test_ps_threads_lists_every_thread_of_a_process(guest, facts, capsys):
    theirs = sorted(int(l.split()[1]) for l in facts["threads"].splitlines() if l.startswith("tid "))
    assert len(theirs) == 4, facts["threads"]  # main thread and three workers
    rows = json.loads(run_inspect(capsys, "--json", "ps", "--threads"))
    ours = sorted(r["pid"] for r in rows if r["tgid"] == theirs[0])
    assert ours == theirs
    assert all(r["comm"] == "threads" and r["kind"] == "user" for r in rows if r["tgid"] == theirs[0])
    processes = json.loads(run_inspect(capsys, "--json", "ps"))
    assert [r["pid"] for r in processes if r["tgid"] == theirs[0]] == [theirs[0]]  # leaders only

