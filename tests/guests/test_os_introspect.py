"""The host reads the OS guest's process table, vCPUs and system-call table out of guest memory through
the kernel profile, and finds what the guest itself reports."""

from __future__ import annotations

import re

import pytest

from pyrovisor.builder import build_vm
from pyrovisor.capture import Console
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.introspect import GuestKernel, guest_profile, load_archive
from pyrovisor.vmm import Vmm

pytestmark = pytest.mark.kvm

MiB = 1 << 20
PROGRAMS = ("counter count=0 period_ms=20; memcheck mib=4 passes=0 interval_ms=20; kwriter keep=1; "
            "counter count=0 period_ms=30 cpu=1")


def start_os(console: Console) -> Vmm:
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", memory_size=128 * MiB, vcpus=2, cmdline=PROGRAMS,
                           initrd=directory / "os-programs.img")
    vmm = build_vm(config, console.write)
    vmm.start()
    return vmm


def test_the_host_reads_the_process_list_the_guest_reports() -> None:
    console = Console()
    with start_os(console) as vmm:
        console.wait_for(r"^memcheck 2: pass 2 ok")
        console.wait_for(r"^counter 4: beat 3 ")
        console.wait_for(r"^os: pid 3 \(kwriter\) exited with 0")
        vmm.pause()
        assert vmm.is_parked
        kernel = GuestKernel(vmm.memory, guest_profile())
        processes = kernel.processes()
        cpus = kernel.cpus()
        table = {entry.name: entry.handler_symbol for entry in kernel.syscall_table()}
        images = {p.pid: kernel.read_process_memory(p, 0x400000, 64) for p in processes if p.state != "exited"}
        vmm.resume()
        console.wait_for(r"^counter 1: beat 100 ")  # still alive after being read

    started = {int(m[1]): m[2] for m in re.finditer(r"^os: pid (\d+) (\w+) started", console.text(), re.MULTILINE)}
    assert started == {1: "counter", 2: "memcheck", 3: "kwriter", 4: "counter"}
    assert {p.pid: p.name for p in processes} == started
    by_pid = {p.pid: p for p in processes}
    assert by_pid[3].state == "exited" and by_pid[3].exit_code == 0 and by_pid[3].args == "keep=1"
    for pid in (1, 2, 4):
        process = by_pid[pid]
        assert process.state in ("runnable", "running", "sleeping")
        assert process.syscalls > 0 and process.pages_mapped is not None and process.pages_mapped > 0
        assert process.args in PROGRAMS
    assert by_pid[2].pages_mapped is not None and by_pid[2].pages_mapped >= 4 * MiB // 4096  # memcheck's buffer
    assert by_pid[4].affinity == 1 and by_pid[4].cpus_ran == (1,)
    assert len({p.cr3 for p in processes}) == len(processes), "every process has its own page tables"

    # Each live process's page tables map its program's image from the archive, read-only and shared.
    archive = {entry.name: entry for entry in load_archive(guests_dir() / "os-programs.img")}
    archive_bytes = (guests_dir() / "os-programs.img").read_bytes()
    for pid, image in images.items():
        entry = archive[by_pid[pid].name]
        assert image == archive_bytes[entry.offset:entry.offset + 64]

    assert [cpu.online for cpu in cpus] == [True, True]
    assert sum(cpu.switches for cpu in cpus) >= sum(p.switches for p in processes)
    # kwriter left its hook in place (keep=1): getpid's entry now points at the time handler.
    assert table["getpid"] == "sys_time"
    assert table["time"] == "sys_time" and table["write"] == "sys_write" and table["exit"] == "sys_exit"


def test_the_profile_describes_the_shipped_kernel() -> None:
    profile = guest_profile()
    assert profile.matches(guests_dir() / "os.elf")
    layout = profile.struct("process")
    assert layout.field("pid").offset == 0 and layout.field("name").size == 16
    assert profile.symbol("syscall_table").address % 4096 == 0, "the table has a page of its own"
