"""virtio-balloon with the OS guest's driver: a target set through the API is reached, the host's RSS falls by
about that much and the balloon deflates again; statistics arrive at their interval; a snapshot keeps the
balloon; the command line's --balloon and `ctl balloon`."""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import VmmProcess

from pyrovisor.api.client import ApiClient
from pyrovisor.api.server import ControlServer
from pyrovisor.api.vm_routes import VmRoutes
from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import BalloonConfig, MachineConfig
from pyrovisor.devices.virtio.balloon import VirtioBalloon, find_balloon
from pyrovisor.memory import GuestMemory
from pyrovisor.snapshot.take import take_snapshot
from pyrovisor.vmm import Vmm

pytestmark = pytest.mark.kvm

MiB = 1 << 20
PAGE = 4096
RAM_MIB = 128
WORKLOAD = "counter count=0 period_ms=50"  # keeps the guest alive (and busy) until it is stopped
GUEST_LINE = re.compile(r"os: balloon: target (\d+) pages, now (\d+) pages \(took (\d+) ms\)")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mincore.restype = ctypes.c_int


def resident_bytes(memory: GuestMemory) -> int:
    """Host RAM backing the guest's memory now (mincore(2) on every region's mapping)."""
    total = 0
    for region in memory.regions:
        vector = ctypes.create_string_buffer(region.size // PAGE)
        assert _libc.mincore(region.host_address, region.size, vector) == 0, os.strerror(ctypes.get_errno())
        total += PAGE * sum(byte & 1 for byte in vector.raw)
    return total


def process_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def prefault(memory: GuestMemory) -> None:
    """Make every page of guest RAM resident without changing it (a guest that has used all its memory once)."""
    for region in memory.regions:
        view = region.view
        for offset in range(0, region.size, PAGE):
            view[offset] = view[offset]


def config(interval: float = 0.5, programs: str = WORKLOAD) -> MachineConfig:
    return MachineConfig(kernel=guests_dir() / "os.elf", initrd=guests_dir() / "os-programs.img",
                         memory_size=RAM_MIB * MiB, vcpus=1, cmdline=programs,
                         balloon=BalloonConfig(stats_interval_s=interval))


def balloon_of(vmm: Vmm) -> VirtioBalloon:
    balloon = find_balloon(vmm.devices)
    assert balloon is not None
    return balloon


def wait_until(condition: Callable[[], bool], what: str, vmm: Vmm, output: bytearray, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or vmm.outcome is not None:
            raise AssertionError(f"{what}: {vmm.outcome}\n" + output.decode(errors="replace")[-2500:])
        time.sleep(0.01)


@contextmanager
def api(vmm: Vmm, socket_path: Path) -> Iterator[ApiClient]:
    server = ControlServer(socket_path, VmRoutes(vmm).routes)
    try:
        yield ApiClient(socket_path, timeout=30)
    finally:
        server.close()


def guest_reports(output: bytearray) -> list[tuple[int, int, int]]:
    return [(int(m[1]), int(m[2]), int(m[3])) for m in GUEST_LINE.finditer(output.decode(errors="replace"))]


def test_the_guest_inflates_to_the_target_and_the_host_gets_the_memory(tmp_path: Path) -> None:
    output = bytearray()
    with build_vm(config(), output.extend) as vmm, api(vmm, tmp_path / "api.sock") as client:
        prefault(vmm.memory)
        balloon = balloon_of(vmm)
        vmm.start()
        wait_until(lambda: balloon.status().driver_ready, "the guest's driver starts the balloon", vmm, output)
        time.sleep(0.5)
        before, rss_before = resident_bytes(vmm.memory), process_rss()
        target_mib = 64
        document = client.post("/balloon", {"target_mib": target_mib})
        assert document["target_pages"] == target_mib * 256
        started = time.monotonic()
        wait_until(lambda: client.get("/balloon")["actual_pages"] == target_mib * 256, "inflated", vmm, output)
        inflate_s = time.monotonic() - started
        status = balloon.status()
        after, rss_after = resident_bytes(vmm.memory), process_rss()
        assert status.ballooned_pages == target_mib * 256 and status.counters.inflate_rejected == 0
        given_back = before - after
        print(f"\ninflate {target_mib} MiB: {inflate_s * 1000:.0f} ms seen by the host "
              f"({target_mib / inflate_s:.0f} MiB/s); guest RAM resident {before / MiB:.1f} -> {after / MiB:.1f} MiB, "
              f"process RSS {rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB; {guest_reports(output)}")
        assert target_mib * MiB * 0.95 <= given_back <= target_mib * MiB * 1.05, given_back / MiB
        assert rss_before - rss_after >= target_mib * MiB * 0.8, "the process gave the memory back to the host"

        client.post("/balloon", {"target_mib": 0})
        started = time.monotonic()
        wait_until(lambda: client.get("/balloon")["actual_pages"] == 0, "deflated", vmm, output)
        deflate_s = time.monotonic() - started
        status = balloon.status()
        assert status.ballooned_pages == 0 and status.counters.deflated_pages == target_mib * 256
        print(f"deflate {target_mib} MiB: {deflate_s * 1000:.0f} ms ({target_mib / deflate_s:.0f} MiB/s); "
              f"{guest_reports(output)}")
        reports = guest_reports(output)
        assert (target_mib * 256, target_mib * 256) in [(t, a) for t, a, _ in reports]
        assert (0, 0) in [(t, a) for t, a, _ in reports]
        assert vmm.outcome is None, "the guest kept running"


def test_statistics_arrive_at_the_interval(tmp_path: Path) -> None:
    output = bytearray()
    with build_vm(config(interval=0.5), output.extend) as vmm:
        balloon = balloon_of(vmm)
        vmm.start()
        wait_until(lambda: balloon.stats is not None, "the first statistics", vmm, output, timeout=30)
        arrivals: list[float] = []
        deadline = time.monotonic() + 3.2
        while time.monotonic() < deadline:
            stats = balloon.stats
            assert stats is not None
            if not arrivals or stats.arrived != arrivals[-1]:
                arrivals.append(stats.arrived)
            time.sleep(0.01)
        stats = balloon.stats
        assert stats is not None and stats.total is not None and stats.free is not None
        assert 0 < stats.free <= stats.total <= RAM_MIB * MiB
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        print(f"\nstatistics every {sum(gaps) / len(gaps):.3f} s (gaps {[round(g, 3) for g in gaps]}): {stats}")
        assert len(arrivals) >= 5 and all(0.3 <= gap <= 1.0 for gap in gaps), gaps


def test_a_snapshot_keeps_target_actual_and_statistics(tmp_path: Path) -> None:
    output = bytearray()
    with build_vm(config(), output.extend) as vmm:
        prefault(vmm.memory)
        balloon = balloon_of(vmm)
        vmm.start()
        wait_until(lambda: balloon.status().driver_ready, "the driver", vmm, output)
        balloon.set_target(32 * 256)
        wait_until(lambda: balloon.status().actual_pages == 32 * 256 and balloon.stats is not None, "inflated", vmm,
                   output)
        vmm.pause()
        saved = balloon.status()
        take_snapshot(vmm, tmp_path / "snap")
        vmm.stop()
    after = bytearray()
    with restore_vm(tmp_path / "snap", after.extend) as restored:
        balloon = balloon_of(restored)
        status = balloon.status()
        assert (status.target_pages, status.actual_pages, status.ballooned_pages) == (32 * 256, 32 * 256, 32 * 256)
        assert status.stats == saved.stats and status.counters == saved.counters and status.stats_held
        restored.start()
        first = balloon.stats
        wait_until(lambda: balloon.stats is not first, "statistics after the restore (the held buffer went back)",
                   restored, after)
        balloon.set_target(0)
        wait_until(lambda: balloon.status().actual_pages == 0, "deflated after the restore", restored, after)
        assert balloon.status().counters.deflated_pages == 32 * 256
        balloon.set_target(48 * 256)  # inflating lazily restored (file-backed, copy-on-write) memory
        wait_until(lambda: balloon.status().actual_pages == 48 * 256, "inflated after the restore", restored, after)
        status = balloon.status()
        assert status.ballooned_pages == 48 * 256 and status.counters.inflate_rejected == 0
        print(f"\nrestored: {guest_reports(after)}")
        restored.stop()


def test_run_with_balloon_on_the_command_line(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    vmm = VmmProcess(["run", "os", "--memory", f"{RAM_MIB}M", "--vcpus", "1", "--balloon", "stats=0.5", "--args",
                      WORKLOAD], socket_path)
    try:
        ctl = [sys.executable, "-m", "pyrovisor", "ctl", str(socket_path), "balloon"]
        vmm.wait_for(lambda: vmm.api.get("/balloon")["driver_ready"], "the guest's driver")
        answer = subprocess.run([*ctl, "--target-mib", "16", "--json"], capture_output=True, text=True, timeout=30)
        assert answer.returncode == 0, answer.stderr
        vmm.wait_for(lambda: vmm.api.get("/balloon")["actual_pages"] == 16 * 256, "inflated", timeout=60)
        vmm.wait_for(lambda: vmm.api.get("/balloon")["stats"] is not None, "statistics", timeout=30)
        shown = subprocess.run(ctl, capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0 and "target 16 MiB (4096 pages)" in shown.stdout, shown.stdout + shown.stderr
        assert "guest memory (" in shown.stdout
        too_much = subprocess.run([*ctl, "--target-mib", str(RAM_MIB + 1)], capture_output=True, text=True, timeout=30)
        lines = too_much.stderr.strip().splitlines()
        assert too_much.returncode == 1 and len(lines) == 1 and "between 0 and 128" in lines[0], too_much.stderr
        vmm.api.post("/stop")
        assert vmm.finish()[0] == 0
    finally:
        vmm.kill()
    without = VmmProcess(["run", "os", "--memory", f"{RAM_MIB}M", "--args", WORKLOAD], tmp_path / "plain.sock")
    try:
        refused = subprocess.run([sys.executable, "-m", "pyrovisor", "ctl", str(tmp_path / "plain.sock"), "balloon"],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and "no balloon" in refused.stderr, refused.stderr
        without.api.post("/stop")
        without.finish()
    finally:
        without.kill()
    run = [sys.executable, "-m", "pyrovisor", "run", "os", "--memory", "128M"]
    for value, message in (("stats=x", "stats must be a number of seconds"), ("stats=-1", "stats must be 0"),
                           ("fast", "expected [stats=SECONDS]"), ("stats=1,stats=2", "stats given twice")):
        bad = subprocess.run([*run, "--balloon", value], capture_output=True, text=True, timeout=60)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("pyrovisor: error:"), bad.stderr
        assert message in lines[0], lines[0]
