"""Set-up and tear-down cannot leak: a failure injected at every build and restore step, and a vCPU that
will not stop, leave no file descriptor, KVM or guest-memory mapping, or thread behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyrovisor import builder
from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.errors import PyrovisorError
from pyrovisor.kvm import VcpuFd
from pyrovisor.snapshot.take import take_snapshot
from pyrovisor.vstate.vm import Vm

pytestmark = pytest.mark.kvm

MEMORY = 64 << 20


class InjectedFault(Exception):
    """The failure a test injects into a step."""


@dataclass(frozen=True)
class Resources:
    fds: tuple[str, ...]  # what each open fd points at
    mappings: tuple[str, ...]  # KVM, guest-memory and snapshot mappings
    threads: int

    def differences(self, other: Resources) -> list[str]:
        found = []
        if sorted(self.fds) != sorted(other.fds):
            found.append(f"fds {sorted(set(other.fds) - set(self.fds)) or 'closed extra'}")
        if sorted(self.mappings) != sorted(other.mappings):
            found.append(f"mappings {sorted(set(other.mappings) - set(self.mappings))}")
        if self.threads != other.threads:
            found.append(f"{other.threads - self.threads} thread(s)")
        return found


def resources(snapshot_dir: Path | None = None) -> Resources:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            continue  # the fd listdir itself used
    mappings = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(value, 16) for value in fields[0].split("-"))
        path = fields[5] if len(fields) == 6 else ""
        big_anonymous = not path and end - start >= MEMORY  # guest RAM (Python's heap never maps this much)
        ours = "kvm" in path or "pyrovisor-guest" in path or (snapshot_dir is not None and str(snapshot_dir) in path)
        if big_anonymous or ours:
            mappings.append(f"{path or 'anonymous'} {end - start:#x}")
    return Resources(tuple(fds), tuple(mappings), len(os.listdir("/proc/self/task")))


def os_config(dirty_ring: int = 256) -> MachineConfig:
    return MachineConfig(kernel=guests_dir() / "os.elf", initrd=guests_dir() / "os-programs.img",
                         memory_size=MEMORY, vcpus=2, cmdline="counter count=0 period_ms=20",
                         dirty_ring_entries=dirty_ring)


def failing_after(step: Callable[[builder.Assembly], None]) -> Callable[[builder.Assembly], None]:
    def wrapped(assembly: builder.Assembly) -> None:
        step(assembly)
        raise InjectedFault(step.__name__)

    wrapped.__name__ = step.__name__
    return wrapped


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("leaks") / "snap"
    with build_vm(os_config(), lambda data: None) as vmm:
        vmm.start()
        time.sleep(0.3)
        take_snapshot(vmm, directory)
    return directory


@pytest.fixture
def baseline(snapshot_dir: Path) -> Iterator[Resources]:
    """Resources with nothing of a VM left, after one full cycle (lazy one-time set-up done)."""
    with restore_vm(snapshot_dir, lambda data: None) as vmm:
        vmm.run(timeout=0.1)
    yield resources(snapshot_dir)


@pytest.mark.parametrize("index", range(len(builder.BUILD_RECIPE) + 1))
def test_a_failure_at_any_build_step_releases_everything(index: int, baseline: Resources, snapshot_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = list(builder.BUILD_RECIPE)
    if index < len(recipe):
        recipe[index] = failing_after(recipe[index])
    else:  # the very end: the Vmm object itself fails to come into being
        monkeypatch.setattr(builder, "Vmm", lambda **kwargs: (_ for _ in ()).throw(InjectedFault("Vmm")))
    monkeypatch.setattr(builder, "BUILD_RECIPE", tuple(recipe))
    with pytest.raises(InjectedFault):
        build_vm(os_config(), lambda data: None)
    assert not baseline.differences(resources(snapshot_dir))


@pytest.mark.parametrize("index", range(len(builder.RESTORE_RECIPE) + 1))
def test_a_failure_at_any_restore_step_releases_everything(index: int, baseline: Resources, snapshot_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = list(builder.RESTORE_RECIPE)
    if index < len(recipe):
        recipe[index] = failing_after(recipe[index])
    else:  # after assembly: turning on dirty tracking for the sandbox fails
        monkeypatch.setattr("pyrovisor.vstate.dirty.DirtyTracker.subscribe",
                            lambda self: (_ for _ in ()).throw(InjectedFault("subscribe")))
    monkeypatch.setattr(builder, "RESTORE_RECIPE", tuple(recipe))
    with pytest.raises(InjectedFault):
        restore_vm(snapshot_dir, lambda data: None, track_dirty=True)
    assert not baseline.differences(resources(snapshot_dir))


def test_failures_inside_steps_release_what_the_step_made(baseline: Resources, snapshot_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The second vCPU, the second dirty ring: a step that fails half-way keeps nothing either."""
    created = {"vcpus": 0, "rings": 0}
    create_vcpu, map_ring = Vm.create_vcpu, VcpuFd.map_dirty_ring

    def second_vcpu_fails(self: Vm, index: int) -> VcpuFd:
        created["vcpus"] += 1
        if created["vcpus"] == 2:
            raise InjectedFault("create_vcpu")
        return create_vcpu(self, index)

    def second_ring_fails(self: VcpuFd, size: int):  # type: ignore[no-untyped-def]
        created["rings"] += 1
        if created["rings"] == 2:
            raise InjectedFault("map_dirty_ring")
        return map_ring(self, size)

    for target, replacement in (("create_vcpu", second_vcpu_fails), ("map_dirty_ring", second_ring_fails)):
        owner = Vm if target == "create_vcpu" else VcpuFd
        with monkeypatch.context() as patch:
            patch.setattr(owner, target, replacement)
            for attempt in (lambda: build_vm(os_config(), lambda data: None),
                            lambda: restore_vm(snapshot_dir, lambda data: None)):
                created["vcpus"] = created["rings"] = 0
                with pytest.raises(InjectedFault):
                    attempt()
                assert not baseline.differences(resources(snapshot_dir)), target


def test_close_releases_everything_even_when_a_vcpu_does_not_stop(baseline: Resources, snapshot_dir: Path) -> None:
    """A vCPU stuck in a device handler (its console write blocks) cannot stop in time: close still
    releases every fd and mapping, says so, and the thread ends once it is unblocked."""
    gate = threading.Event()
    gate.set()

    def console(data: bytes) -> None:
        gate.wait()

    vmm = restore_vm(snapshot_dir, console)
    vmm.start()
    time.sleep(0.2)
    gate.clear()  # the next console write blocks its vCPU
    time.sleep(0.3)
    started = time.monotonic()
    with pytest.raises(PyrovisorError, match=r"did not stop within 0.5 s; their resources were released"):
        vmm.close(join_timeout=0.5)
    assert time.monotonic() - started < 5
    gate.set()
    for vcpu in vmm.vcpus:
        assert vcpu.join(10), "the stuck vCPU thread ends once unblocked (its fd is gone)"
    # join() returns when Python is done with the thread; the OS thread leaves /proc/self/task a moment later.
    deadline = time.monotonic() + 2
    while (left := baseline.differences(resources(snapshot_dir))) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not left
