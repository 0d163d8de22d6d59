"""The races of one VM's life with real vCPUs: resume during stop-and-copy, the throttler during a capture,
a pause that times out, and requests that conflict with a snapshot or a migration."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyrovisor.builder import build_vm
from pyrovisor.catalog import load_catalog
from pyrovisor.config import MachineConfig
from pyrovisor.errors import LifecycleError, MigrationError
from pyrovisor.migration.destination import receive
from pyrovisor.migration.source import migrate
from pyrovisor.migration.throttle import Throttler
from pyrovisor.persist.machine import MachineState
from pyrovisor.snapshot.take import take_snapshot
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.lifecycle import VmState

pytestmark = pytest.mark.kvm

TICK = re.compile(rb"^tick (\d+) ok", re.MULTILINE)


class Console:
    """The ticker's console; it prints a tick every 10 ms while it runs."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()
        self.gate = threading.Event()  # cleared: the next console write blocks (a vCPU stuck in a device)
        self.gate.set()

    def __call__(self, chunk: bytes) -> None:
        self.gate.wait()
        with self.lock:
            self.data.extend(chunk)

    def ticks(self) -> int:
        with self.lock:
            return len(TICK.findall(self.data))

    def wait_ticks(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.ticks() < count:
            assert time.monotonic() < deadline, f"only {self.ticks()} ticks"
            time.sleep(0.01)

    def frozen_for(self, seconds: float) -> bool:
        before = self.ticks()
        time.sleep(seconds)
        return self.ticks() == before

    def advancing(self, timeout: float = 10) -> bool:
        before = self.ticks()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ticks() >= before + 3:
                return True
            time.sleep(0.01)
        return False


@contextmanager
def ticker() -> Iterator[tuple[Vmm, Console]]:
    console = Console()
    config = MachineConfig(kernel=load_catalog()["ticker"].elf, memory_size=64 << 20,
                           cmdline="ticks=0 period_ms=10 buffer_mib=1")
    with build_vm(config, console) as vmm:
        vmm.start()
        console.wait_ticks(3)
        yield vmm, console


def block_save_state(vmm: Vmm) -> tuple[threading.Event, threading.Event]:
    """Make the next `save_state` (which runs while its caller holds the guest) wait until released."""
    reached, release = threading.Event(), threading.Event()
    original: Callable[[], MachineState] = vmm.save_state

    def blocking() -> MachineState:
        reached.set()
        assert release.wait(30)
        return original()

    vmm.save_state = blocking  # type: ignore[method-assign]
    return reached, release


def start_receiver(tmp_path: Path) -> tuple[str, threading.Thread, list[object]]:
    address = f"unix:{tmp_path / 'migrate.sock'}"
    listening = threading.Event()
    arrivals: list[object] = []

    def run() -> None:
        try:
            arrivals.append(receive(address, lambda data: None, accept_timeout=30, on_listening=listening.set))
        except BaseException as exc:  # reported to the test through `arrivals`
            arrivals.append(exc)
            listening.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert listening.wait(30)
    return address, thread, arrivals


def test_a_user_resume_during_stop_and_copy_does_not_let_the_guest_run(tmp_path: Path) -> None:
    address, receiver, arrivals = start_receiver(tmp_path)
    with ticker() as (vmm, console):
        reached, release = block_save_state(vmm)
        results: list[object] = []
        source = threading.Thread(target=lambda: results.append(migrate(vmm, address)), daemon=True)
        source.start()
        assert reached.wait(30), "the migration reached stop-and-copy"
        assert vmm.state is VmState.MIGRATING
        assert vmm.resume() is VmState.MIGRATING, "the user's resume leaves migration's hold"
        assert console.frozen_for(0.3), "the guest ran while migration held it"
        release.set()
        source.join(60)
        assert results, "the migration finished"
        assert vmm.state is VmState.MIGRATED_AWAY
        with pytest.raises(LifecycleError, match="the VM is migrated-away"):
            vmm.resume()
    receiver.join(30)
    arrival = arrivals[0]
    assert not isinstance(arrival, BaseException), arrival
    arrival.vmm.close()  # type: ignore[attr-defined]


def test_the_throttler_never_resumes_a_guest_held_for_a_capture() -> None:
    with ticker() as (vmm, console):
        throttler = Throttler(vmm)
        throttler.set(0.5)
        try:
            assert console.advancing(), "a half throttle slows the guest, it does not stop it"
            with vmm.paused("snapshot"):
                assert console.frozen_for(0.4), "the throttler's resume let the guest run during a capture"
        finally:
            throttler.stop()
        assert console.advancing()
        assert vmm.lifecycle.held_by == []


def test_a_pause_that_times_out_rolls_back_and_the_guest_runs_on() -> None:
    with ticker() as (vmm, console):
        console.gate.clear()  # the vCPU blocks in its next console write and cannot park
        time.sleep(0.1)
        with pytest.raises(LifecycleError, match=r"did not park within 0\.3 s"):
            vmm.pause(timeout=0.3)
        console.gate.set()
        assert vmm.state is VmState.RUNNING and vmm.lifecycle.held_by == []
        assert console.advancing(), "the guest runs again: the failed pause left no hold behind"


def test_snapshot_and_migration_exclude_each_other_with_the_state_named(tmp_path: Path) -> None:
    with ticker() as (vmm, console):
        reached, release = block_save_state(vmm)
        snapshot = threading.Thread(target=take_snapshot, args=(vmm, tmp_path / "snap"), daemon=True)
        snapshot.start()
        assert reached.wait(30)
        with pytest.raises(MigrationError, match=r"a snapshot is in progress \(the VM is snapshotting\)"):
            migrate(vmm, f"unix:{tmp_path / 'nobody.sock'}")
        release.set()
        snapshot.join(30)
        assert (tmp_path / "snap" / "state").exists()
        assert console.advancing()

    address, receiver, arrivals = start_receiver(tmp_path)
    with ticker() as (vmm, console):
        reached, release = block_save_state(vmm)
        source = threading.Thread(target=migrate, args=(vmm, address), daemon=True)
        source.start()
        assert reached.wait(30)
        with pytest.raises(LifecycleError, match=r"a migration is in progress \(the VM is migrating\)"):
            take_snapshot(vmm, tmp_path / "during")
        assert not (tmp_path / "during").exists(), "a refused snapshot writes nothing"
        release.set()
        source.join(60)
    receiver.join(30)
    arrival = arrivals[0]
    assert not isinstance(arrival, BaseException), arrival
    arrival.vmm.close()  # type: ignore[attr-defined]
