"""Revert-per-run sandbox: restore a base snapshot, run one program in the guest, report what it changed."""

from pyrovisor.sandbox.report import ChangedRange, SandboxReport
from pyrovisor.sandbox.session import Sandbox, make_base

__all__ = ["ChangedRange", "Sandbox", "SandboxReport", "make_base"]
