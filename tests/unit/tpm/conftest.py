"""Fixtures for the host-side TPM tests: a real swtpm (skipped with a reason where it is not installed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm_helpers import Booted, boot, need_swtpm, need_tss

from pyrovisor.tpm.swtpm import Swtpm


@pytest.fixture
def swtpm() -> Iterator[Swtpm]:
    need_swtpm()
    with Swtpm.start() as tpm:
        yield tpm


@pytest.fixture
def booted(tmp_path: Path) -> Iterator[Booted]:
    need_swtpm()
    need_tss()
    with Swtpm.start() as tpm:
        machine = boot(tpm, tmp_path / "files")
        try:
            yield machine
        finally:
            machine.commands.close()
