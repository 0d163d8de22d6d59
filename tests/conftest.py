"""Shared pytest set-up: the `kvm` marker skips, with a reason, only where /dev/kvm cannot be used."""

from __future__ import annotations

import os

import pytest

KVM_PATH = "/dev/kvm"


def _kvm_unusable_reason() -> str | None:
    if not os.path.exists(KVM_PATH):
        return f"{KVM_PATH} does not exist on this host (no KVM module loaded or not exposed to this container)"
    if not os.access(KVM_PATH, os.R_OK | os.W_OK):
        return f"{KVM_PATH} exists but this user cannot open it read-write (add the user to the 'kvm' group)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _kvm_unusable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)
