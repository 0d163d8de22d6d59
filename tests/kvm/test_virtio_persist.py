"""virtio devices across a snapshot and a live migration taken in the middle of block I/O: the guest carries on
where it was, and every sector it wrote is on the disk byte-exact."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from harness import VmmProcess
from test_migration import Receiver, free_port
from test_virtio_devices import pattern, raw_disk

from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import DiskConfig, MachineConfig
from pyrovisor.devices.virtio.mmio import VirtioMmio
from pyrovisor.snapshot.take import take_snapshot

pytestmark = pytest.mark.kvm

SECTORS = 16384  # 8 MiB: about a second of 4 KiB requests with interrupts here
WORKLOAD = f"blk mode=write,flush,verify sectors={SECTORS} seed=5 wait=irq timeout_ms=60000"
WROTE = f"PASS: blk 1: wrote {SECTORS} sectors from sector 0 with seed 5"
VERIFIED = f"PASS: blk 1: verified {SECTORS} sectors from sector 0 with seed 5: all match"


def test_a_snapshot_in_the_middle_of_block_io_restores_and_finishes(tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "disk.img", 16)
    config = MachineConfig(kernel=guests_dir() / "os.elf", initrd=guests_dir() / "os-programs.img",
                           memory_size=128 << 20, cmdline=WORKLOAD, disks=(DiskConfig(disk),))
    before = bytearray()
    with build_vm(config, before.extend) as vmm:
        vmm.start()
        blk = vmm.devices["blk0"]
        assert isinstance(blk, VirtioMmio)
        deadline = time.monotonic() + 30
        while blk.device.stats.writes < 200:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline and vmm.outcome is None, before.decode(errors="replace")
            time.sleep(0.01)
        vmm.pause()
        writes_at_snapshot = blk.device.stats.writes  # type: ignore[attr-defined]
        take_snapshot(vmm, tmp_path / "snap")
        vmm.stop()
    assert writes_at_snapshot < SECTORS // 8, "the snapshot was taken in the middle of the writes"
    after = bytearray()
    with restore_vm(tmp_path / "snap", after.extend) as restored:
        outcome = restored.run(timeout=120)
    console = after.decode(errors="replace")
    assert outcome.exit_code == 0, console[-1500:]
    assert WROTE in console and VERIFIED in console
    assert disk.read_bytes()[:SECTORS * 512] == pattern(5, 0, SECTORS)


def test_live_migration_in_the_middle_of_block_io(tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "disk.img", 16)
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock")
    source = VmmProcess(["run", "os", "--memory", "128M", "--vcpus", "1", "--disk", str(disk), "--args", WORKLOAD],
                        tmp_path / "source.sock")
    try:
        source.wait_for(lambda: re.search(r"blk 1: virtio 0", source.text()) is not None, "the blk program", 30)
        time.sleep(0.2)  # writes are under way
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "wait": True})
        assert status["state"] == "completed", status
        assert source.finish()[0] == 0
        code, out, err = receiver.finish(timeout=120)
        assert code == 0, err + out[-1500:]
    finally:
        source.kill()
        receiver.kill()
    assert WROTE not in source.text(), "the migration happened before the writes were done"
    assert WROTE in out and VERIFIED in out, out[-1500:]
    assert disk.read_bytes()[:SECTORS * 512] == pattern(5, 0, SECTORS)
