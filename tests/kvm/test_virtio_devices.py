"""pyrovisor's virtio devices with the OS guest's drivers: rng and blk over ioeventfd and irqfd, the data on the
host file byte-exact, read-only and several disks, both wait modes, and what the guest sees of memory the VMM
writes while it polls."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyrovisor.builder import build_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import DiskConfig, MachineConfig
from pyrovisor.devices.virtio.mmio import VirtioMmio

pytestmark = pytest.mark.kvm

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def pattern(seed: int, first: int, count: int) -> bytes:
    """What `blk mode=write seed=E` writes into sectors [first, first+count) (guests/programs/blk.c)."""
    words = []
    offset = (seed + 1) * GOLDEN
    for sector in range(first, first + count):
        for index in range(64):
            value = (sector * 64 + index + offset) & MASK
            value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK
            value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK
            words.append(value ^ (value >> 31))
    return struct.pack(f"<{len(words)}Q", *words)


def os_config(programs: str, **devices: object) -> MachineConfig:
    return MachineConfig(kernel=guests_dir() / "os.elf", initrd=guests_dir() / "os-programs.img",
                         memory_size=128 << 20, vcpus=1, cmdline=programs, **devices)  # type: ignore[arg-type]


def run_os(programs: str, timeout: float = 60, **devices: object) -> tuple[int | None, str]:
    output = bytearray()
    with build_vm(os_config(programs, **devices), output.extend) as vmm:
        outcome = vmm.run(timeout=timeout)
    return outcome.exit_code, output.decode(errors="replace")


def raw_disk(path: Path, mib: int) -> Path:
    with path.open("wb") as handle:
        handle.truncate(mib << 20)
    return path


@pytest.mark.parametrize("wait", ["poll", "irq"])
def test_blk_and_rng_round_trip_through_the_host_file(tmp_path: Path, wait: str) -> None:
    disk = raw_disk(tmp_path / "disk.img", 16)
    code, console = run_os(f"rng wait={wait}; blk mode=write,flush,verify,id start=64 sectors=512 seed=9 "
                           f"wait={wait} start_ms=300", disks=(DiskConfig(disk, serial="pyro-disk"),), rng=True)
    assert code == 0, console[-2000:]
    assert re.search(r"^os: virtio 0: base 0xc0000000 size 0x1000 irq 5: device 2 \(block\)", console, re.MULTILINE)
    assert re.search(r"^os: virtio 1: base 0xc0001000 size 0x1000 irq 6: device 4 \(entropy\)", console, re.MULTILINE)
    assert "blk 2: serial 'pyro-disk'" in console
    assert "PASS: rng 1: byte histogram is plausible" in console
    data = disk.read_bytes()
    assert data[64 * 512:(64 + 512) * 512] == pattern(9, 64, 512), "the guest's writes reached the file exactly"
    assert data[:64 * 512] == bytes(64 * 512) and data[(64 + 512) * 512:] == bytes(len(data) - (64 + 512) * 512)


def test_the_guest_reads_what_the_host_wrote_and_read_only_disks_refuse(tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "disk.img", 4)
    disk.write_bytes(pattern(3, 0, 256) + bytes((4 << 20) - 256 * 512))
    second = raw_disk(tmp_path / "second.img", 4)
    before = second.read_bytes()
    code, console = run_os("blk mode=verify sectors=256 seed=3; blk dev=1 mode=write,id start_ms=200",
                           disks=(DiskConfig(disk), DiskConfig(second, read_only=True, serial="ro")))
    assert "PASS: blk 1: verified 256 sectors from sector 0 with seed 3: all match" in console, console[-2000:]
    assert "PASS: blk 2: write to the read-only device refused with status 1 (IOERR)" in console
    assert second.read_bytes() == before
    assert code == 0


def test_a_polling_guest_never_sees_a_value_the_vmm_is_writing(tmp_path: Path) -> None:
    """The VMM rewrites a counter in guest memory as fast as it can while a user-mode program spins on it:
    every value the guest reads is one the VMM wrote (typed writes are single stores, never cleared first)."""
    output = bytearray()
    with build_vm(os_config("memwatch width=8 seconds=2", rng=True), output.extend) as vmm:
        vmm.start()
        deadline = time.monotonic() + 20
        while not (found := re.search(rb"memwatch 1: phys ([0-9a-f]+)", output)):
            assert time.monotonic() < deadline and vmm.outcome is None, output.decode(errors="replace")
            time.sleep(0.001)
        counter = int(found.group(1), 16) + 0x908
        stop = threading.Event()

        def write() -> None:
            value = 1
            while not stop.is_set():
                vmm.memory.write_u64(counter, value << 16)
                vmm.memory.write_u16(counter + 2, value & 0xFFFF)
                value += 1

        writer = threading.Thread(target=write)
        writer.start()
        try:
            outcome = vmm.wait(30)
        finally:
            stop.set()
            writer.join(10)
    assert outcome is not None and outcome.exit_code == 0, output.decode(errors="replace")[-1000:]
    result = re.search(r"memwatch 1: (\d+) reads, (\d+) went backwards", output.decode())
    assert result is not None and int(result.group(1)) > 1_000_000
    assert int(result.group(2)) == 0, output.decode()[-600:]


def test_device_options_on_the_command_line(tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "disk.img", 4)
    run = [sys.executable, "-m", "pyrovisor", "run", "os", "--memory", "128M", "--vcpus", "1"]
    good = subprocess.run([*run, "--disk", f"{disk},serial=cli", "--rng", "--args", "blk mode=id; rng start_ms=100"],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "blk 1: serial 'cli'" in good.stdout and "PASS: rng 2" in good.stdout
    for flags, message in ((["--disk", f"{disk},fast"], "expected FILE[,ro][,serial=S]"),
                           (["--disk", f"{disk},speed=2"], "unknown option 'speed'"),
                           (["--disk", f"{disk},serial={'x' * 21}"], "serial is at most 20 bytes"),
                           (["--disk", str(tmp_path / "missing.img")], "No such file"),
                           (["--disk", str(tmp_path)], "Is a directory"),
                           (["--net", "mac=52:54:00:00:00:01"], "expected tap=NAME"),
                           (["--vsock", "cid=x,uds=/tmp/v"], "cid must be a number")):
        bad = subprocess.run([*run, *flags], capture_output=True, text=True, timeout=60)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("pyrovisor: error:"), bad.stderr
        assert message in lines[0], lines[0]


def test_devices_are_registered_and_wired_through_the_manager(tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "disk.img", 4)
    with build_vm(os_config("blk mode=id", disks=(DiskConfig(disk),), rng=True), lambda data: None) as vmm:
        assert [(e.name, e.kind.name, e.placement.mmio, e.placement.irq) for e in vmm.devices][3:] == [
            ("blk0", "virtio-blk", (0xC0000000, 0x1000), 5), ("rng0", "virtio-rng", (0xC0001000, 0x1000), 6)]
        blk = vmm.devices["blk0"]
        assert isinstance(blk, VirtioMmio)
        vmm.run(timeout=30)
        assert blk.stats.notifications >= 1 and blk.stats.trapped_notifications == 0, \
            "every doorbell arrived by ioeventfd: no notify ran Python on a vCPU"
