"""Snapshots of running guests: restore in a new process, diffs, refusal of bad files, repeatability.
The running guests are the OS with `counter` (liveness) and `memcheck` (integrity); the format tests use
the small ticker guest."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from harness import VmmProcess, assert_guest_continued, beats_in, os_run_args, restore_and_read

from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.catalog import guests_dir, load_catalog
from pyrovisor.config import MachineConfig
from pyrovisor.devices.serial import SerialState
from pyrovisor.errors import StateError
from pyrovisor.persist.codec import decode
from pyrovisor.snapshot.chain import load_chain
from pyrovisor.snapshot.file_format import HEADER
from pyrovisor.snapshot.take import take_snapshot
from pyrovisor.vstate.vcpu_state import MSR_IA32_TSC, VcpuState

pytestmark = pytest.mark.kvm

TICKER_ARGS = "ticks=0 period_ms=10 buffer_mib=8"
# A heartbeat every 20 ms and an 8 MiB pattern verified every 20 ms (docs/guest-os.md), until stopped.
OS_PROGRAMS = "counter count=0 period_ms=20; memcheck mib=8 passes=0 interval_ms=20"


def ticker_config(args: str = TICKER_ARGS) -> MachineConfig:
    return MachineConfig(kernel=load_catalog()["ticker"].elf, memory_size=64 << 20, cmdline=args)


def os_config(programs: str = OS_PROGRAMS, vcpus: int = 2) -> MachineConfig:
    directory = guests_dir()
    return MachineConfig(kernel=directory / "os.elf", initrd=directory / "os-programs.img", memory_size=64 << 20,
                         vcpus=vcpus, cmdline=programs)


LAPIC_TIMER_CURRENT_COUNT = slice(0x390, 0x394)  # in the LAPIC register page


def without_running_clocks(vcpus: tuple[VcpuState, ...]) -> list[VcpuState]:
    """vCPU states minus what keeps counting while a VM is paused: IA32_TSC and the LAPIC timer's count."""
    stopped = []
    for vcpu in vcpus:
        lapic = bytearray(vcpu.lapic)
        lapic[LAPIC_TIMER_CURRENT_COUNT] = bytes(4)
        stopped.append(replace(vcpu, lapic=bytes(lapic),
                               msrs=tuple((index, value) for index, value in vcpu.msrs if index != MSR_IA32_TSC)))
    return stopped


def wait_for_beats(output: bytearray, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(beats_in(output.decode(errors="replace").splitlines())) < count:
        assert time.monotonic() < deadline, f"no {count} beats in time:\n{output.decode(errors='replace')}"
        time.sleep(0.01)


def test_snapshot_of_running_guest_continues_in_a_new_process(tmp_path: Path) -> None:
    vmm = VmmProcess(os_run_args(OS_PROGRAMS, memory="64M"), tmp_path / "api.sock")
    try:
        vmm.wait_for_beat(5)
        vmm.api.post("/pause")
        before = vmm.settled_text()
        report = vmm.api.post("/snapshot", {"path": str(tmp_path / "snap")})
        assert report["kind"] == "full" and report["paused_seconds"] < 5
        vmm.api.post("/resume")
        vmm.wait_for_beat(max(vmm.beats()) + 3)
        vmm.api.post("/stop")
        code, stderr = vmm.finish()
        assert code == 0, stderr
    finally:
        vmm.kill()
    for mode in ([], ["--eager"]):
        # The count continues where it was paused (no reset, no jump), and memcheck passes again.
        assert_guest_continued(before, restore_and_read(tmp_path / "snap", 10, *mode), beats_after=10)


def test_diff_snapshot_restores_the_same_machine_as_a_full_one(tmp_path: Path) -> None:
    output = bytearray()
    with build_vm(os_config(), output.extend) as vmm:
        vmm.start()
        wait_for_beats(output, 3)
        take_snapshot(vmm, tmp_path / "base")
        time.sleep(0.2)
        assert vmm.pause().value == "paused"
        diff = take_snapshot(vmm, tmp_path / "diff", "diff")
        full = take_snapshot(vmm, tmp_path / "full")
        assert 0 < diff.pages < full.pages / 10, "a diff holds only the pages written since its base"
        assert diff.memory_bytes == diff.pages * 4096
    chain = load_chain(tmp_path / "diff")
    assert [link.directory.name for link in chain] == ["base", "diff"]
    assert without_running_clocks(chain[-1].state.machine.vcpus) == \
        without_running_clocks(load_chain(tmp_path / "full")[-1].state.machine.vcpus)
    with restore_vm(tmp_path / "diff", lambda data: None) as from_diff, \
            restore_vm(tmp_path / "full", lambda data: None) as from_full:
        for a, b in zip(from_diff.memory.regions, from_full.memory.regions, strict=True):
            assert a.size == b.size and hashlib.sha256(a.view).digest() == hashlib.sha256(b.view).digest()
    before = output.decode(errors="replace")
    from_diff_output, from_full_output = restore_and_read(tmp_path / "diff", 5), restore_and_read(tmp_path / "full", 5)
    assert_guest_continued(before, from_diff_output, beats_after=5)
    assert_guest_continued(before, from_full_output, beats_after=5)
    first_beats = [[beat for beat, _ in beats_in(text.splitlines())][:5] for text in (from_diff_output, from_full_output)]
    assert first_beats[0] == first_beats[1]


def test_restoring_the_same_snapshot_twice_behaves_the_same(tmp_path: Path) -> None:
    output = bytearray()
    with build_vm(os_config(), output.extend) as vmm:
        vmm.start()
        wait_for_beats(output, 3)
        take_snapshot(vmm, tmp_path / "snap")
    first, second = ([beat for beat, _ in beats_in(restore_and_read(tmp_path / "snap", 4).splitlines())][:4]
                     for _ in range(2))
    assert first == second
    digests = []
    for _ in range(2):  # the same state after the same number of exits
        with restore_vm(tmp_path / "snap", lambda data: None) as vmm:
            digests.append(hashlib.sha256(vmm.memory.regions[0].view).hexdigest())
    assert digests[0] == digests[1]


@pytest.fixture(scope="module")
def snapshot_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full snapshot and a diff on top of it, taken once for the refusal tests."""
    root = tmp_path_factory.mktemp("snapshots")
    with build_vm(ticker_config("ticks=0 period_ms=5 buffer_mib=1"), lambda data: None) as vmm:
        vmm.start()
        time.sleep(0.3)
        take_snapshot(vmm, root / "full")
        time.sleep(0.1)
        take_snapshot(vmm, root / "diff", "diff")
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def _files_state(directory: Path) -> dict[str, tuple[int, str]]:
    return {str(path.relative_to(directory)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(directory.rglob("*")) if path.is_file()}


def _kvm_and_snapshot_fds(directory: Path) -> list[str]:
    """Open descriptors that would betray a half-built VM: KVM objects, or the snapshot's own files."""
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile (another thread's pipe)
        if "kvm" in target or target.startswith(str(directory)):
            targets.append(target)
    return sorted(targets)


def _refused(directory: Path, message: str, **options: bool) -> None:
    before, fds = _files_state(directory.parent), _kvm_and_snapshot_fds(directory.parent)
    with pytest.raises(StateError, match=message):
        restore_vm(directory, lambda data: None, **options)
    assert _files_state(directory.parent) == before, "a refused snapshot is left untouched"
    assert _kvm_and_snapshot_fds(directory.parent) == fds, "nothing is left open (no VM was created)"


def test_corrupt_state_file_is_refused(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    state = copy / "full" / "state"
    data = bytearray(state.read_bytes())
    data[HEADER.size + 100] ^= 0x01
    state.write_bytes(bytes(data))
    _refused(copy / "full", "checksum mismatch")


def test_truncated_state_file_is_refused(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    state = copy / "full" / "state"
    state.write_bytes(state.read_bytes()[:-100])
    _refused(copy / "full", "truncated")
    state.write_bytes(b"")
    _refused(copy / "full", "truncated")


def test_wrong_version_is_refused(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    state = copy / "full" / "state"
    data = bytearray(state.read_bytes())
    struct.pack_into("<H", data, 8, 1)  # the format before the device manager
    digest = hashlib.sha256(bytes(data[:-32])).digest()
    state.write_bytes(bytes(data[:-32]) + digest)
    _refused(copy / "full", "format version 1 is not supported .*take the snapshot again")


def test_oversized_state_file_is_refused(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    state = copy / "full" / "state"
    data = bytearray(state.read_bytes())
    struct.pack_into("<Q", data, 16, 1 << 40)
    state.write_bytes(bytes(data))
    _refused(copy / "full", "exceeds the .* byte cap")
    with open(state, "wb") as handle:
        handle.truncate(128 << 20)
    _refused(copy / "full", "larger than any valid state file")


def test_damaged_memory_files_are_refused(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    (copy / "diff" / "memory.diff").rename(copy / "diff" / "moved")
    _refused(copy / "diff", "memory file is missing")
    (copy / "diff" / "moved").rename(copy / "diff" / "memory.diff")
    memory = copy / "full" / "memory.img"
    with open(memory, "r+b") as handle:
        handle.seek(0x100000)
        handle.write(b"\xde\xad")
    _refused(copy / "full", "memory file checksum mismatch", verify=True)
    _refused(copy / "full", "memory file checksum mismatch", lazy=False, verify=True)
    os.truncate(memory, 4096)
    _refused(copy / "full", "memory file has 4096 bytes")


def test_diff_without_its_base_is_refused(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    shutil.rmtree(copy / "full")
    _refused(copy / "diff", "snapshot directory not found")


def test_diff_over_a_different_base_is_refused(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    with build_vm(ticker_config("ticks=0 period_ms=5 buffer_mib=1"), lambda data: None) as vmm:
        take_snapshot(vmm, tmp_path / "other")
    shutil.rmtree(copy / "full")
    shutil.copytree(tmp_path / "other", copy / "full")
    _refused(copy / "diff", "but its diff was taken from")


def test_cli_reports_a_refused_snapshot_in_one_line(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    (copy / "full" / "state").write_bytes(b"garbage")
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "restore", str(copy / "full")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("pyrovisor: error:") and "truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_snapshot_refuses_to_overwrite_and_diff_needs_a_base(tmp_path: Path) -> None:
    with build_vm(ticker_config(), lambda data: None) as vmm:
        with pytest.raises(StateError, match="needs an earlier snapshot"):
            take_snapshot(vmm, tmp_path / "diff", "diff")
        take_snapshot(vmm, tmp_path / "full")
        with pytest.raises(StateError, match="never overwritten"):
            take_snapshot(vmm, tmp_path / "full")


def test_hostile_guest_snapshot_restores_its_garbled_devices(tmp_path: Path) -> None:
    """A guest that fills the UART and buses with garbage is snapshotted mid-way and finishes after restore."""
    config = MachineConfig(kernel=load_catalog()["chaos"].elf, memory_size=32 << 20,
                           cmdline="operations=60000 seed=7")
    with build_vm(config, lambda data: None) as vmm:
        vmm.start()
        time.sleep(1.0)
        take_snapshot(vmm, tmp_path / "snap")
        assert vmm.wait(120) is not None
    records = {record.name: record for record in load_chain(tmp_path / "snap")[-1].state.machine.devices}
    state_at_snapshot = decode(SerialState, records["serial0"].state)
    output = bytearray()
    with restore_vm(tmp_path / "snap", output.extend) as restored:
        assert restored.console.save() == state_at_snapshot
        outcome = restored.run(timeout=120)
    assert outcome.exit_code == 0, output[-300:]
    assert b"PASS: 60000 random device accesses" in output
