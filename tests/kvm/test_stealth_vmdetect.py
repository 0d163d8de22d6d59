"""--stealth against the OS guest's `vmdetect` and a Multiboot kernel: per check, what this host shows, derived
from facts the test reads (the host's CPU flags, KVM's CPUID table, which KVM module is loaded)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from harness import VmmProcess

from multiboot_kernels import MultibootKernels, build_multiboot_kernels
from pyrovisor.arch.x86_64.cpuid import LEAF_FEATURES, CpuidEntry
from pyrovisor.arch.x86_64.stealth import (
    HYPERVISOR_BIT,
    NEUTRAL_STRINGS,
    PYROVISOR_STRINGS,
    brand_from_entries,
    host_brand_string,
)
from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import BOOT_MULTIBOOT, MachineConfig
from pyrovisor.kvm import Kvm
from pyrovisor.snapshot.take import take_snapshot

pytestmark = pytest.mark.kvm

VERDICT = re.compile(r"^vmdetect: (?P<check>[a-z0-9-]+): (?P<verdict>detected|not-detected|unavailable) "
                     r"\((?P<evidence>.*)\)$")
SUMMARY = re.compile(r"^vmdetect: summary: (\d+) detected, (\d+) not-detected, (\d+) unavailable$")
PVM_MODULE = Path("/sys/module/kvm_pvm")  # kvm_pvm: guest user mode reads the host's CPUID and TSC directly


class Verdict(NamedTuple):
    verdict: str
    evidence: str

    @property
    def detected(self) -> bool:
        return self.verdict == "detected"


class Run(NamedTuple):
    verdicts: dict[str, Verdict]
    stderr: str


def run_vmdetect(*extra: str) -> Run:
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "run", "os-vmdetect", "--rng", *extra],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts: dict[str, Verdict] = {}
    summary = None
    for line in result.stdout.splitlines():
        if match := VERDICT.match(line):
            assert match["check"] not in verdicts, f"{match['check']} reported twice"
            verdicts[match["check"]] = Verdict(match["verdict"], match["evidence"])
        elif match := SUMMARY.match(line):
            summary = tuple(int(group) for group in match.groups())
    assert summary is not None, result.stdout
    counted = tuple(sum(v.verdict == name for v in verdicts.values()) for name in ("detected", "not-detected",
                                                                                   "unavailable"))
    assert summary == counted
    return Run(verdicts, result.stderr)


class HostFacts(NamedTuple):
    host_hypervisor_flag: bool  # the host's own CPUID.1:ECX[31], as Linux shows it in /proc/cpuinfo
    user_mode_reads_host_cpuid: bool  # kvm_pvm: KVM_SET_CPUID2 has no effect on CPL3 reads
    table: tuple[CpuidEntry, ...]  # what pyrovisor gives KVM_SET_CPUID2 without --stealth
    host_brand: bytes | None


@pytest.fixture(scope="module")
def facts() -> HostFacts:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    with Kvm() as kvm:
        table = kvm.get_supported_cpuid()
    return HostFacts("hypervisor" in flags.split(), PVM_MODULE.exists(), table, host_brand_string())


@pytest.fixture(scope="module")
def plain() -> Run:
    return run_vmdetect()


@pytest.fixture(scope="module")
def stealth() -> Run:
    return run_vmdetect("--stealth")


def _leaf(table: tuple[CpuidEntry, ...], function: int) -> CpuidEntry | None:
    return next((entry for entry in table if entry.function == function and entry.index == 0), None)


def test_every_check_reports_once_in_both_runs(plain: Run, stealth: Run) -> None:
    assert set(plain.verdicts) == set(stealth.verdicts)
    assert {"cpuid-hypervisor-bit-cpl3", "cpuid-hypervisor-bit-cpl0", "rdtsc-cpuid-delta", "rdtsc-exit-delta",
            "timer-drift", "vmware-backdoor-port", "virtio-vendor-id", "mac-prefix"} <= set(plain.verdicts)


def test_cpuid_at_cpl0_follows_the_table_pyrovisor_sets(facts: HostFacts, plain: Run, stealth: Run) -> None:
    """The kernel's CPUID (SYS_CPUID) answers from the vCPU's CPUID table, even on kvm_pvm (emulated CPL0)."""
    features = _leaf(facts.table, LEAF_FEATURES)
    assert features is not None
    assert plain.verdicts["cpuid-hypervisor-bit-cpl0"].detected == bool(features.ecx & HYPERVISOR_BIT)
    assert not stealth.verdicts["cpuid-hypervisor-bit-cpl0"].detected
    assert "CPUID.1:ECX[31]=0" in stealth.verdicts["cpuid-hypervisor-bit-cpl0"].evidence
    assert plain.verdicts["cpuid-hypervisor-leaves-cpl0"].detected == (_leaf(facts.table, 0x40000000) is not None)
    assert not stealth.verdicts["cpuid-hypervisor-leaves-cpl0"].detected
    table_brand = brand_from_entries(facts.table).decode("ascii", "replace")
    assert f'"{table_brand}"' in plain.verdicts["cpuid-brand-string-cpl0"].evidence
    if facts.host_brand is not None:
        assert f'"{facts.host_brand.decode("ascii", "replace")}"' in stealth.verdicts["cpuid-brand-string-cpl0"].evidence


def test_cpuid_at_cpl3_is_the_hosts_on_kvm_pvm_and_the_tables_elsewhere(facts: HostFacts, plain: Run,
                                                                         stealth: Run) -> None:
    features = _leaf(facts.table, LEAF_FEATURES)
    assert features is not None
    bit_plain, bit_stealth = (run.verdicts["cpuid-hypervisor-bit-cpl3"] for run in (plain, stealth))
    if facts.user_mode_reads_host_cpuid:  # nothing the VMM sets reaches user mode: both runs read the host
        assert bit_plain.detected == bit_stealth.detected == facts.host_hypervisor_flag
        assert plain.verdicts["cpuid-hypervisor-leaves-cpl3"] == stealth.verdicts["cpuid-hypervisor-leaves-cpl3"]
        if facts.host_brand is not None:
            brand = f'"{facts.host_brand.decode("ascii", "replace")}"'
            assert brand in plain.verdicts["cpuid-brand-string-cpl3"].evidence
            assert brand in stealth.verdicts["cpuid-brand-string-cpl3"].evidence
    else:  # CPUID exits on VMX/SVM: the table rules at every privilege level
        assert bit_plain.detected == bool(features.ecx & HYPERVISOR_BIT)
        assert not bit_stealth.detected
        assert not stealth.verdicts["cpuid-hypervisor-leaves-cpl3"].detected


def test_device_strings_flip_and_device_presence_does_not(plain: Run, stealth: Run) -> None:
    assert plain.verdicts["virtio-vendor-id"].detected
    assert f"{PYROVISOR_STRINGS.virtio_vendor_id:#x}" in plain.verdicts["virtio-vendor-id"].evidence
    assert stealth.verdicts["virtio-vendor-id"] == Verdict("not-detected",
                                                           f'VendorID {NEUTRAL_STRINGS.virtio_vendor_id:#x} "...."')
    for run in (plain, stealth):  # an rng device is there in both runs: virtio itself is a VM's
        assert run.verdicts["virtio-devices"].detected
        assert run.verdicts["mac-prefix"].verdict == "unavailable"  # no virtio-net here
        assert run.verdicts["qemu-fw-cfg-port"].verdict == "not-detected"  # pyrovisor's own machine has no fw_cfg
        assert run.verdicts["cmdline-strings"].verdict == "not-detected"
        assert run.verdicts["vmware-backdoor-port"].verdict == "unavailable"


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match is not None, text
    return int(match.group(1))


def test_timing_verdicts_follow_their_measurements(plain: Run, stealth: Run) -> None:
    assert "TSC compensation unavailable" in stealth.stderr or "TSC compensation available" in stealth.stderr
    for run in (plain, stealth):
        cpuid = run.verdicts["rdtsc-cpuid-delta"]
        assert cpuid.detected == (_number(r"mean (\d+) cycles", cpuid.evidence) > 1000)
        exit_delta = run.verdicts["rdtsc-exit-delta"]
        assert exit_delta.detected == (_number(r"median (\d+) ns", exit_delta.evidence) > 10000)
        drift = run.verdicts["timer-drift"]
        assert drift.detected == (_number(r"drift -?(\d+) ppm", drift.evidence) > 20000)
    if "TSC compensation unavailable" in stealth.stderr:  # nothing hides the time an exit takes
        assert plain.verdicts["rdtsc-exit-delta"].detected == stealth.verdicts["rdtsc-exit-delta"].detected


def _single_cpu_threads(pid: int) -> list[int]:
    """The CPUs of the process's threads that are pinned to exactly one CPU (not counting KVM's own workers, such as
    kvm-nx-lpage-recovery, which the kernel starts from a vCPU thread and which inherit its CPU mask)."""
    pinned = []
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            if (status.parent / "comm").read_text().startswith("kvm"):
                continue
            allowed = next(line for line in status.read_text().splitlines() if line.startswith("Cpus_allowed_list"))
        except (OSError, StopIteration):
            continue
        value = allowed.split(":", 1)[1].strip()
        if value.isdigit():
            pinned.append(int(value))
    return pinned


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "api.sock"


@pytest.mark.parametrize("stealthy", [False, True], ids=["plain", "stealth"])
def test_stealth_pins_each_vcpu_thread_to_one_host_cpu(socket_path: Path, stealthy: bool) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two host CPUs to tell a pinned thread from an unpinned one")
    args = ["run", "os", "--vcpus", "2", "--args", "counter count=0 period_ms=20", *(["--stealth"] if stealthy else [])]
    vmm = VmmProcess(args, socket_path)
    try:
        vmm.wait_for_beat(1, timeout=60)
        deadline = time.monotonic() + 10
        pinned = _single_cpu_threads(vmm.process.pid)
        while stealthy and len(pinned) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            pinned = _single_cpu_threads(vmm.process.pid)
    finally:
        vmm.kill()
    allowed = sorted(os.sched_getaffinity(0))
    assert sorted(pinned) == (allowed[:2] if stealthy else [])


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> MultibootKernels:
    return build_multiboot_kernels(tmp_path_factory.mktemp("multiboot"))


@pytest.mark.parametrize("stealthy", [False, True], ids=["plain", "stealth"])
def test_a_multiboot_kernel_reads_neutral_firmware_strings(kernels: MultibootKernels, stealthy: bool) -> None:
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "run", str(kernels.elf), "--memory", "32M",
                             *(["--stealth"] if stealthy else [])],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    strings = NEUTRAL_STRINGS if stealthy else PYROVISOR_STRINGS
    assert f"mb: loader={strings.boot_loader_name.decode()}" in result.stdout.splitlines(), result.stdout
    assert any(line.startswith("acpi: rsdp found") for line in result.stdout.splitlines()), result.stdout  # checksums


@pytest.mark.parametrize("stealthy", [False, True], ids=["plain", "stealth"])
def test_no_firmware_string_names_pyrovisor_under_stealth(kernels: MultibootKernels, stealthy: bool) -> None:
    """Guest memory below the kernel (boot-data page, ACPI tables) as the guest would find it."""
    config = MachineConfig(kernel=kernels.elf, memory_size=32 << 20, boot_protocol=BOOT_MULTIBOOT, stealth=stealthy)
    with build_vm(config, lambda data: None) as vmm:
        low = vmm.memory.read(0, 1 << 20).lower()
    assert (b"pyro" in low or b"pyrv" in low) == (not stealthy)


def _wait_for(output: bytearray, text: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in output:
        assert time.monotonic() < deadline, f"no {text!r} in time:\n{output.decode(errors='replace')}"
        time.sleep(0.01)


def test_stealth_survives_snapshot_and_restore(tmp_path: Path) -> None:
    """The profile is part of the saved configuration and state: a vmdetect that starts only after the restore
    still finds no hypervisor bit at CPL0 and a neutral virtio vendor, and the vCPUs are pinned again."""
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", initrd=directory / "os-programs.img", memory_size=64 << 20,
                           cmdline="counter count=0 period_ms=20; vmdetect start_ms=2500", rng=True, stealth=True)
    output = bytearray()
    with build_vm(config, output.extend) as vmm:
        vmm.start()
        _wait_for(output, b"beat 2 ", timeout=30)
        take_snapshot(vmm, tmp_path / "snap")
    assert b"vmdetect:" not in output, "vmdetect must run after the restore"
    restored = bytearray()
    with restore_vm(tmp_path / "snap", restored.extend) as vmm:
        assert vmm.config.stealth
        assert all(len(vcpu.host_cpus) == 1 for vcpu in vmm.vcpus)
        vmm.start()
        _wait_for(restored, b"vmdetect: summary", timeout=60)
    verdicts = {match["check"]: match["verdict"] for line in restored.decode(errors="replace").splitlines()
                if (match := VERDICT.match(line))}
    assert verdicts["cpuid-hypervisor-bit-cpl0"] == "not-detected"
    assert verdicts["cpuid-hypervisor-leaves-cpl0"] == "not-detected"
    assert verdicts["virtio-vendor-id"] == "not-detected"
