"""The exception hierarchy of pyrovisor: one base, shallow subclasses, structured fields."""

from __future__ import annotations

import errno as errno_codes
import os


class PyrovisorError(Exception):
    """Base of every error pyrovisor raises on purpose; `str()` is a one-line message for users."""


class KvmError(PyrovisorError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        self.detail = detail
        reason = os.strerror(errno) if errno else "failed"
        name = errno_codes.errorcode.get(errno, str(errno))
        suffix = f": {detail}" if detail else ""
        super().__init__(f"{ioctl} failed with {name} ({reason}){suffix}")


class KvmUnavailableError(PyrovisorError):
    """/dev/kvm is missing or not accessible; the message says how to fix it."""

    def __init__(self, path: str, reason: str, hint: str) -> None:
        self.path = path
        self.reason = reason
        self.hint = hint
        super().__init__(f"cannot use {path}: {reason}. {hint}")


class ConfigError(PyrovisorError):
    """A configuration value (CLI flag, API field, manifest entry) is malformed or out of range."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field} {value!r}: {reason}")


class GuestMemoryError(PyrovisorError):
    """An access to guest physical memory fell outside the guest's RAM."""

    def __init__(self, gpa: int, size: int, reason: str) -> None:
        self.gpa = gpa
        self.size = size
        self.reason = reason
        super().__init__(f"guest memory access at {gpa:#x} (+{size:#x}): {reason}")


class LoaderError(PyrovisorError):
    """A guest image cannot be loaded (missing, not ELF, wrong machine, does not fit)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load {path}: {reason}")


class DeviceError(PyrovisorError):
    """A device was configured wrongly or given inconsistent state (never raised for guest accesses)."""

    def __init__(self, device: str, reason: str) -> None:
        self.device = device
        self.reason = reason
        super().__init__(f"{device}: {reason}")


class GuestError(PyrovisorError):
    """The guest stopped in a way that is not a clean exit (triple fault, failed entry, emulation error)."""

    def __init__(self, vcpu: int, reason: str, detail: str = "") -> None:
        self.vcpu = vcpu
        self.reason = reason
        self.detail = detail
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"vCPU {vcpu}: {reason}{suffix}")


class StateError(PyrovisorError):
    """Saved machine state (a snapshot file, a migration stream) is corrupt, truncated or incompatible."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class MigrationError(PyrovisorError):
    """A live migration failed; the source keeps running."""

    def __init__(self, phase: str, reason: str) -> None:
        self.phase = phase
        self.reason = reason
        super().__init__(f"migration failed during {phase}: {reason}")


class ControlError(PyrovisorError):
    """A control-API request failed: the VMM is unreachable or refused the request."""

    def __init__(self, endpoint: str, reason: str, status: int | None = None) -> None:
        self.endpoint = endpoint
        self.reason = reason
        self.status = status
        super().__init__(f"{endpoint}: {reason}")


class LifecycleError(PyrovisorError):
    """A request does not fit the VM's current state (resume while migrated away, migrate while
    snapshotting, a pause that could not complete); nothing was changed."""

    def __init__(self, request: str, state: str, reason: str) -> None:
        self.request = request
        self.state = state
        self.reason = reason
        super().__init__(f"cannot {request}: {reason} (the VM is {state})")


class MissingExtraError(PyrovisorError):
    """A command needs an optional part of pyrovisor (a pip extra) that is not installed."""

    def __init__(self, command: str, extra: str, modules: tuple[str, ...]) -> None:
        self.command = command
        self.extra = extra
        self.modules = modules
        verb = "is" if len(modules) == 1 else "are"
        super().__init__(f"{command} needs {' and '.join(modules)}, which {verb} not installed: "
                         f"pip install 'pyrovisor[{extra}]'")


class MissingToolError(PyrovisorError):
    """A feature needs a host program that is not installed; the message names the package to install."""

    def __init__(self, feature: str, tool: str, packages: str) -> None:
        self.feature = feature
        self.tool = tool
        self.packages = packages
        super().__init__(f"{feature} needs {tool}, which is not installed: apt-get install {packages}")


class TpmError(PyrovisorError):
    """The virtual TPM failed: swtpm could not start or stopped answering, or a TPM command failed."""

    def __init__(self, operation: str, reason: str, response_code: int | None = None) -> None:
        self.operation = operation
        self.reason = reason
        self.response_code = response_code
        code = f" (TPM response code {response_code:#x})" if response_code is not None else ""
        super().__init__(f"vTPM {operation}: {reason}{code}")


class AttestationError(PyrovisorError):
    """A quote, an event log, a key or a golden-values file is malformed (a verification that fails is a
    verdict, not an error)."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class JailError(PyrovisorError):
    """The VMM cannot be confined as asked (--jail): a privilege, a kernel feature or a cgroup controller is
    missing, or something the VM needs cannot be put in the jail."""

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"--jail: cannot {step}: {reason}")


class SeccompError(PyrovisorError):
    """A seccomp filter could not be built, exported or loaded (libseccomp or the kernel refused)."""

    def __init__(self, operation: str, errno: int, detail: str = "") -> None:
        self.operation = operation
        self.errno = errno
        self.detail = detail
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"seccomp: {operation} failed: {os.strerror(errno)}{suffix}")


class SeccompViolation(PyrovisorError):
    """A confined thread made a system call its filter does not allow; the call was refused and the VM stopped."""

    def __init__(self, syscall: str, number: int, kind: str, thread: str, tid: int) -> None:
        self.syscall = syscall
        self.number = number
        self.kind = kind
        self.thread = thread
        self.tid = tid
        super().__init__(f"seccomp: the {kind} thread {thread} (tid {tid}) made the forbidden system call "
                         f"{syscall} ({number}); it was refused and the VM stopped")
