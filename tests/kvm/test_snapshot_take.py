"""Taking snapshots: where they may be written, what a failed one leaves behind, and that a failed diff
loses no page for the next one."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from pyrovisor.api.client import ApiClient
from pyrovisor.api.server import ControlServer
from pyrovisor.api.vm_routes import VmRoutes
from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.catalog import load_catalog
from pyrovisor.config import MachineConfig
from pyrovisor.errors import ConfigError, ControlError, StateError
from pyrovisor.snapshot import take
from pyrovisor.snapshot.take import take_snapshot

pytestmark = pytest.mark.kvm


def ticker() -> MachineConfig:
    return MachineConfig(kernel=load_catalog()["ticker"].elf, memory_size=64 << 20,
                         cmdline="ticks=0 period_ms=10 buffer_mib=1")


def test_missing_parent_folders_are_refused_not_created(tmp_path: Path) -> None:
    with build_vm(ticker(), lambda data: None) as vmm:
        vmm.start()
        with pytest.raises(ConfigError, match="does not exist; create it first"):
            take_snapshot(vmm, tmp_path / "a" / "b" / "c")
        assert not (tmp_path / "a").exists()
        (tmp_path / "file").write_text("x")
        with pytest.raises(ConfigError, match="exists and is not a directory"):
            take_snapshot(vmm, tmp_path / "file")
        report = take_snapshot(vmm, tmp_path / "snap")
        assert report.directory.stat().st_mode & 0o777 == 0o700


def test_the_api_answers_bad_snapshot_requests_with_400(tmp_path: Path) -> None:
    with build_vm(ticker(), lambda data: None) as vmm:
        vmm.start()
        socket_path = tmp_path / "api.sock"
        with ControlServer(socket_path, VmRoutes(vmm).routes):
            client = ApiClient(socket_path, timeout=30)
            for body, message in (({"path": str(tmp_path / "x" / "y")}, "does not exist"),
                                  ({"path": 5}, "'path' must be a string"),
                                  ({"path": ""}, "non-empty path"),
                                  ({"path": str(tmp_path / "s"), "kind": "full", "extra": 1}, "unknown field"),
                                  ({"path": str(tmp_path / "s"), "kind": 7}, "'kind' must be a string")):
                with pytest.raises(ControlError, match=message) as info:
                    client.post("/snapshot", body)
                assert info.value.status == 400, body
            for body, message in (({"to": 4444}, "'to' must be a string"),
                                  ({"to": "x:1", "downtime_ms": "fast"}, "'downtime_ms' must be a number"),
                                  ({"to": "x:1", "max_rounds": -1}, "'max_rounds' must be positive"),
                                  ({"to": "x:1", "wait": "yes"}, "'wait' must be true or false")):
                with pytest.raises(ControlError, match=message) as info:
                    client.post("/migrate", body)
                assert info.value.status == 400, body
            client.post("/pause")
            with pytest.raises(ControlError, match="the VM is paused") as info:
                client.post("/migrate", {"to": "127.0.0.1:1"})
            assert info.value.status == 409
            assert client.post("/resume")["state"] == "running"


def test_a_failed_diff_removes_its_files_and_the_next_diff_still_has_every_page(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = bytearray()
    with build_vm(ticker(), output.extend) as vmm:
        vmm.start()
        time.sleep(0.3)
        take_snapshot(vmm, tmp_path / "base")
        time.sleep(0.2)  # the guest writes pages, owed to the next diff

        def disk_full(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(take, "write_diff_image", disk_full)
            with pytest.raises(StateError, match="No space left on device"):
                take_snapshot(vmm, tmp_path / "failed", "diff")
        assert not (tmp_path / "failed").exists(), "a failed snapshot leaves nothing that looks like one"
        time.sleep(0.1)
        vmm.pause()
        take_snapshot(vmm, tmp_path / "diff", "diff")
        take_snapshot(vmm, tmp_path / "full")
    with restore_vm(tmp_path / "diff", lambda data: None) as from_diff, \
            restore_vm(tmp_path / "full", lambda data: None) as from_full:
        for a, b in zip(from_diff.memory.regions, from_full.memory.regions, strict=True):
            assert bytes(a.view) == bytes(b.view), "the diff after a failed one carries every page since its base"
