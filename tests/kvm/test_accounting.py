"""Per-process accounting on the real OS guest: exits charged to the right process, the API, `pyrovisor top`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import VmmProcess

from pyrovisor.builder import build_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.errors import ControlError
from pyrovisor.introspect.accounting import accountant_of, set_accounting
from pyrovisor.kvm.vcpu import VALID_REGS_OFFSET

pytestmark = pytest.mark.kvm

MiB = 1 << 20
PORT = 0x510
MMIO = 0xD0000000
PYROVISOR = [sys.executable, "-m", "pyrovisor"]


def os_config(programs: str) -> MachineConfig:
    directory = guests_dir()
    return MachineConfig(kernel=directory / "os.elf", memory_size=64 * MiB, vcpus=2, cmdline=programs,
                         initrd=directory / "os-programs.img")


def by_pid(report: dict[str, object]) -> dict[int | None, dict[str, object]]:
    processes = report["processes"]
    assert isinstance(processes, list)
    return {row["pid"]: row for row in processes}


def count_at(row: dict[str, object], kind: str, where: int) -> int:
    targets = row["targets"]
    assert isinstance(targets, list)
    return sum(target["count"] for target in targets if target["kind"] == kind and target["where"] == where)


def test_two_processes_on_two_vcpus_are_charged_exactly_their_exits() -> None:
    console = bytearray()
    programs = f"exits mode=pio port={PORT:#x} count=3000 cpu=0; exits mode=pio port={PORT:#x} count=5000 cpu=1"
    with build_vm(os_config(programs), console.extend) as vmm:
        accountant = set_accounting(vmm, True)
        assert vmm.vcpus[0].account is accountant.accounts[0]
        outcome = vmm.run(timeout=120)
        text = console.decode(errors="replace")
        assert outcome.exit_code == 0, outcome.describe() + text
        assert "PASS: exits 1: 3000 pio writes done" in text and "PASS: exits 2: 5000 pio writes done" in text
        report = accountant.report()
    rows = by_pid(report)
    first, second = rows[1], rows[2]
    assert (first["name"], first["vcpus"], count_at(first, "pio", PORT)) == ("exits", [0], 3000)
    assert (second["name"], second["vcpus"], count_at(second, "pio", PORT)) == ("exits", [1], 5000)
    assert sum(count_at(row, "pio", PORT) for row in rows.values()) == 8000, "no write charged to anyone else"
    assert rows[0]["name"] == "kernel" and count_at(rows[0], "pio", PORT) == 0
    assert first["vmm_cpu_ns"] > 0 and second["vmm_cpu_ns"] > 0  # type: ignore[operator]
    assert report["resolutions"] < 50, "the process table is read on CR3 changes, not per exit"


def test_accounting_off_shares_no_registers_and_counts_nothing() -> None:
    console = bytearray()
    with build_vm(os_config(f"exits mode=pio port={PORT:#x} count=200"), console.extend) as vmm:
        outcome = vmm.run(timeout=120)
        assert outcome.exit_code == 0, outcome.describe()
        assert all(vcpu.account is None for vcpu in vmm.vcpus)
        assert all(int.from_bytes(vcpu.fd.run_page[VALID_REGS_OFFSET:VALID_REGS_OFFSET + 8], "little") == 0
                   for vcpu in vmm.vcpus)
        assert accountant_of(vmm) is None


def test_the_api_switches_accounting_at_run_time_and_top_reads_it(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    programs = (f"exits mode=pio port={PORT:#x} count=100000000 cpu=0; "
                f"exits mode=mmio addr={MMIO:#x} size=4 count=100000000 cpu=1")
    vmm = VmmProcess(["run", "os", "--memory", "64M", "--vcpus", "2", "--args", programs], socket_path)
    try:
        vmm.wait_for(lambda: "pid 2 exits started" in vmm.text(), "both programs to start")
        assert vmm.api.get("/accounting") == {"enabled": False, "accounted_seconds": 0.0, "resolutions": 0,
                                              "processes": []}
        assert vmm.api.post("/accounting", {"enabled": True}) == {"enabled": True}
        top = subprocess.run([*PYROVISOR, "top", str(socket_path), "--once", "--json", "--interval", "0.5"],
                             capture_output=True, text=True, timeout=60, check=True)
        rates = {row["pid"]: row for row in json.loads(top.stdout)["processes"]}
        assert rates[1]["exits_per_s"]["pio"] > 100 and rates[1]["exits_per_s"]["mmio"] == 0
        assert rates[2]["exits_per_s"]["mmio"] > 100 and rates[2]["exits_per_s"]["pio"] == 0
        assert 0 < rates[1]["share"] < 1 and abs(rates[1]["share"] + rates[2]["share"] - 1) < 0.02
        table = subprocess.run([*PYROVISOR, "top", str(socket_path), "--once", "--interval", "0.3"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
        assert "exits" in table and "share" in table

        report = by_pid(vmm.api.get("/accounting"))
        assert count_at(report[1], "pio", PORT) > 0 and count_at(report[2], "mmio", MMIO) > 0
        assert vmm.api.post("/accounting", {"enabled": False}) == {"enabled": False}
        frozen = vmm.api.get("/accounting")
        time.sleep(0.3)
        assert vmm.api.get("/accounting")["processes"] == frozen["processes"], "nothing is counted while off"
        assert vmm.api.get("/status")["state"] == "running"

        with pytest.raises(ControlError, match="'enabled' must be true or false"):
            vmm.api.post("/accounting", {"enabled": "yes"})
    finally:
        vmm.kill()


def test_a_guest_without_a_profile_gets_one_clear_error_and_keeps_running(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    vmm = VmmProcess(["run", "ticker", "--args", "ticks=0 period_ms=10 buffer_mib=1"], socket_path)
    try:
        vmm.wait_for_tick(2)
        for call in (lambda: vmm.api.get("/accounting"), lambda: vmm.api.post("/accounting", {"enabled": True})):
            with pytest.raises(ControlError) as caught:
                call()
            assert caught.value.status == 409
            assert "needs a guest whose kernel has a profile" in str(caught.value) and "\n" not in str(caught.value)
        ticks = max(vmm.ticks())
        vmm.wait_for_tick(ticks + 2)
    finally:
        vmm.kill()
    refused = subprocess.run([*PYROVISOR, "run", "hello", "--accounting"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "pyrovisor: error: accounting: needs a guest whose kernel has a profile (the os guest); this VM runs "
        "hello.elf, which has none"]


def test_virtio_queue_work_is_charged_to_the_process_the_kernel_lent_the_device_to() -> None:
    from pyrovisor.devices.virtio.mmio import VirtioMmio

    console = bytearray()
    config = MachineConfig(kernel=guests_dir() / "os.elf", memory_size=128 * MiB, vcpus=2, rng=True,
                           initrd=guests_dir() / "os-programs.img",
                           cmdline=f"exits mode=pio port={PORT:#x} count=500 cpu=1; rng wait=irq cpu=0")
    with build_vm(config, console.extend) as vmm:
        accountant = set_accounting(vmm, True)
        outcome = vmm.run(timeout=120)
        text = console.decode(errors="replace")
        assert outcome.exit_code == 0 and "PASS: rng 2: byte histogram is plausible" in text, text
        transports = [attached.device for attached in vmm.devices if isinstance(attached.device, VirtioMmio)]
        assert len(transports) == 1
        doorbells = transports[0].stats.notifications + transports[0].stats.trapped_notifications
        devices = accountant.report()["devices"]
    assert [(row["device"], row["pid"], row["name"]) for row in devices] == [("rng0", 2, "rng")]
    # every doorbell ran the queue; the transport also runs it once when the driver sets DRIVER_OK
    assert devices[0]["queue_runs"] >= doorbells > 0 and devices[0]["vmm_cpu_ns"] > 0
