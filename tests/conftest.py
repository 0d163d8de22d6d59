"""Shared pytest set-up: the `kvm` marker skips, with a reason, only where /dev/kvm cannot be used; every VMM the
tests start runs its threads under seccomp in audit mode, and a call a filter does not allow fails the session."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

KVM_PATH = "/dev/kvm"

# Set before any VMM starts, in this process or in a child (they inherit the environment): the whole suite runs
# confined in audit mode, and the supervisor logs every call a filter does not allow (which it lets run) here.
# Tests that make a refused call on purpose run their VMM with a log of their own.
_SECCOMP_LOG = os.path.join(tempfile.mkdtemp(prefix="pyrovisor-seccomp-"), "audit.jsonl")
os.environ.setdefault("PYROVISOR_SECCOMP", "audit")
os.environ.setdefault("PYROVISOR_SECCOMP_LOG", _SECCOMP_LOG)


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


def _seccomp_reports() -> list[dict[str, object]]:
    path = os.environ.get("PYROVISOR_SECCOMP_LOG", "")
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as log:
        return [json.loads(line) for line in log if line.strip()]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any VMM thread made a system call its seccomp filter does not allow (audit mode let it run)."""
    reports = _seccomp_reports()
    if not reports:
        return
    calls = sorted({(str(r["kind"]), str(r["syscall"]), str(r.get("thread"))) for r in reports})
    lines = [f"  {kind:<10} {syscall:<18} {thread}" for kind, syscall, thread in calls]
    print(f"\nseccomp audit: {len(reports)} call(s) not allowed by the filters "
          f"({os.environ['PYROVISOR_SECCOMP_LOG']}):\n" + "\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
