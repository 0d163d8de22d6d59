"""One persistence path for devices, vCPUs and the VM: every device saved through the device manager (the
page-discard port included), complete vCPU state (TSC frequency, every listed MSR), refusals before KVM."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from pyrovisor.builder import assemble_vm, build_vm, open_chain_memory, restore_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.devices.page_discard import PageDiscard
from pyrovisor.devices.platform import PAGE_DISCARD
from pyrovisor.errors import StateError
from pyrovisor.kvm import Kvm
from pyrovisor.persist.device import DeviceRecord
from pyrovisor.persist.machine import check_machine_state
from pyrovisor.snapshot.chain import load_chain
from pyrovisor.snapshot.take import take_snapshot

pytestmark = pytest.mark.kvm


def os_config(programs: str) -> MachineConfig:
    return MachineConfig(kernel=guests_dir() / "os.elf", initrd=guests_dir() / "os-programs.img",
                         memory_size=64 << 20, vcpus=1, cmdline=programs)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The OS after a program exited and handed its pages back through the page-discard port."""
    directory = tmp_path_factory.mktemp("persist") / "snap"
    output = bytearray()
    with build_vm(os_config("memcheck mib=4 passes=1; counter count=0 period_ms=20"), output.extend) as vmm:
        vmm.start()
        deadline = time.monotonic() + 30
        while b"memcheck" not in output or b"exited with 0" not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")[-500:]
            time.sleep(0.02)
        time.sleep(0.1)
        take_snapshot(vmm, directory)
    return directory


def test_every_device_is_saved_through_the_manager_and_comes_back(snapshot: Path) -> None:
    machine = load_chain(snapshot)[-1].state.machine
    records = {record.name: record for record in machine.devices}
    assert [(r.name, r.kind, r.port, r.irq) for r in machine.devices] == [
        ("serial0", "uart16550", (0x3F8, 8), 4), ("debug-exit", "debug-exit", (0xF4, 4), None),
        ("page-discard", "page-discard", (0x518, 8), None)]
    discard = records[PAGE_DISCARD].state
    assert discard["requests"] > 0 and discard["pages"] > 0, "the exited program's pages were given back"
    with restore_vm(snapshot, lambda data: None) as vmm:
        device = vmm.devices[PAGE_DISCARD]
        assert isinstance(device, PageDiscard)
        assert (device.requests, device.pages, device.rejected) == (discard["requests"], discard["pages"],
                                                                    discard["rejected"])
        assert vmm.port_bus.lookup(0x518) is not None and vmm.port_bus.lookup(0x518).name == PAGE_DISCARD  # type: ignore[union-attr]
        assert vmm.save_state().devices == machine.devices, "a restored VM saves exactly what it was restored from"


def test_unknown_or_broken_device_records_are_refused_before_kvm(snapshot: Path) -> None:
    machine = load_chain(snapshot)[-1].state.machine
    unknown = replace(machine, devices=(*machine.devices, DeviceRecord("nic0", "e1000", (0xC000, 64), None, 11, {})))
    with pytest.raises(StateError, match="'e1000', which this pyrovisor does not know"):
        check_machine_state(unknown, "test")
    broken = replace(machine, devices=tuple(replace(r, state={"requests": "many"}) if r.name == PAGE_DISCARD else r
                                            for r in machine.devices))
    with pytest.raises(StateError, match=r"page-discard.*requests: expected an integer"):
        check_machine_state(broken, "test")
    twice = replace(machine, devices=(*machine.devices, machine.devices[0]))
    with pytest.raises(StateError, match="appears twice"):
        check_machine_state(twice, "test")


def test_the_tsc_frequency_travels_with_the_vcpu(snapshot: Path) -> None:
    chain = load_chain(snapshot)
    machine = chain[-1].state.machine
    with Kvm() as kvm:
        vm = kvm.create_vm()
        host_khz = vm.create_vcpu(0).get_tsc_khz()
        vm.close()
    assert machine.vcpus[0].tsc_khz == host_khz, "saved with the state"

    faster = replace(machine, vcpus=tuple(replace(v, tsc_khz=v.tsc_khz + 100_000) for v in machine.vcpus))
    with assemble_vm(faster, open_chain_memory(chain), lambda data: None) as vmm:
        assert vmm.vcpus[0].fd.get_tsc_khz() == host_khz + 100_000, "set on restore where KVM allows"

    slower = replace(machine, vcpus=tuple(replace(v, tsc_khz=v.tsc_khz // 2) for v in machine.vcpus))
    with pytest.raises(StateError, match=rf"TSC ran at {host_khz // 2} kHz; this host's runs at {host_khz} kHz"):
        assemble_vm(slower, open_chain_memory(chain), lambda data: None)


def test_an_msr_kvm_cannot_read_is_an_error_not_a_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Kvm.get_msr_index_list

    def with_a_bogus_msr(self: Kvm) -> tuple[int, ...]:
        return (*real(self)[:3], 0xDEAD0000, *real(self)[3:])

    monkeypatch.setattr(Kvm, "get_msr_index_list", with_a_bogus_msr)
    with build_vm(os_config("counter count=1"), lambda data: None) as vmm, \
            pytest.raises(StateError, match="cannot read MSR 0xdead0000"):
        vmm.save_state()
