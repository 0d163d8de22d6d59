"""A ctypes binding of the parts of libseccomp pyrovisor uses: build, export, load and answer filters."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pyrovisor.confine.capabilities import set_no_new_privs
from pyrovisor.errors import MissingToolError, SeccompError

LIBRARY = "libseccomp.so.2"

# Actions (seccomp.h); an action is the filter's answer to a system call.
ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000
ACT_NOTIFY = 0x7FC00000
ACT_LOG = 0x7FFC0000


def act_errno(number: int) -> int:
    """The action that fails the call with `number` without running it."""
    return 0x00050000 | (number & 0xFFFF)


class Compare(IntEnum):
    """enum scmp_compare."""

    NE = 1
    LT = 2
    LE = 3
    EQ = 4
    GE = 5
    GT = 6
    MASKED_EQ = 7


class FilterAttr(IntEnum):
    """enum scmp_filter_attr (the ones used here)."""

    CTL_NNP = 3
    CTL_TSYNC = 4
    CTL_OPTIMIZE = 8


@dataclass(frozen=True)
class ArgCmp:
    """One argument comparison: `arg` (0-5) `op` `value` (for MASKED_EQ: (arg & mask) == value)."""

    arg: int
    op: Compare
    value: int
    mask: int = 0

    def datums(self) -> tuple[int, int]:
        return (self.mask, self.value) if self.op is Compare.MASKED_EQ else (self.value, 0)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class SeccompData(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32), ("instruction_pointer", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]


class Notif(ctypes.Structure):
    """struct seccomp_notif: a system call waiting for the supervisor's answer."""

    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("data", SeccompData)]


class NotifResp(ctypes.Structure):
    """struct seccomp_notif_resp."""

    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


USER_NOTIF_FLAG_CONTINUE = 1  # SECCOMP_USER_NOTIF_FLAG_CONTINUE: let the call run as if allowed


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """libseccomp, loaded once; MissingToolError if it is not installed."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError:
        found = ctypes.util.find_library("seccomp")
        if found is None:
            raise MissingToolError("seccomp confinement", "libseccomp", "libseccomp2") from None
        lib = ctypes.CDLL(found, use_errno=True)
    p, i, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "seccomp_init": (p, [u32]),
        "seccomp_release": (None, [p]),
        "seccomp_attr_set": (i, [p, i, u32]),
        "seccomp_rule_add_array": (i, [p, u32, i, ctypes.c_uint, ctypes.POINTER(_ArgCmp)]),
        "seccomp_export_bpf": (i, [p, i]),
        "seccomp_syscall_resolve_name": (i, [ctypes.c_char_p]),
        "seccomp_syscall_resolve_num_arch": (p, [u32, i]),
        "seccomp_arch_native": (u32, []),
        "seccomp_notify_alloc": (i, [ctypes.POINTER(ctypes.POINTER(Notif)), ctypes.POINTER(ctypes.POINTER(NotifResp))]),
        "seccomp_notify_free": (None, [ctypes.POINTER(Notif), ctypes.POINTER(NotifResp)]),
        "seccomp_notify_receive": (i, [i, ctypes.POINTER(Notif)]),
        "seccomp_notify_respond": (i, [i, ctypes.POINTER(NotifResp)]),
        "seccomp_notify_id_valid": (i, [i, ctypes.c_uint64]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    _lib = lib
    return lib


def _check(rc: int, operation: str, detail: str = "") -> int:
    if rc < 0:  # libseccomp returns -errno
        raise SeccompError(operation, -rc, detail)
    return rc


def syscall_number(name: str) -> int:
    """The x86-64 number of system call `name`; SeccompError if libseccomp does not know it."""
    number = int(library().seccomp_syscall_resolve_name(name.encode()))
    if number < 0:
        raise SeccompError("resolve", errno.EINVAL, f"unknown system call {name!r}")
    return number


_libc = ctypes.CDLL(None, use_errno=True)
_libc.free.argtypes = [ctypes.c_void_p]
_libc.free.restype = None
_libc.syscall.restype = ctypes.c_long
SYS_SECCOMP = 317  # x86-64
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def syscall_name(number: int) -> str:
    """The name of system call `number` on this architecture, or "syscall-N"."""
    lib = library()
    pointer = lib.seccomp_syscall_resolve_num_arch(lib.seccomp_arch_native(), number)
    if not pointer:
        return f"syscall-{number}"
    try:
        return ctypes.string_at(pointer).decode()
    finally:
        _libc.free(pointer)


@dataclass(frozen=True)
class Rule:
    """Allow `syscall` when every comparison holds (no comparison: always)."""

    syscall: str
    args: tuple[ArgCmp, ...] = ()
    action: int = ACT_ALLOW


class Filter:
    """A libseccomp filter context: the default action, then rules; release it with close()."""

    def __init__(self, default_action: int, rules: Sequence[Rule] = ()) -> None:
        self._lib = library()
        ctx = self._lib.seccomp_init(default_action)
        if not ctx:
            raise SeccompError("seccomp_init", errno.EINVAL, f"default action {default_action:#x}")
        self._ctx: int | None = ctx
        try:
            # A binary tree of system call numbers instead of a linear list: fewer instructions per call.
            _check(self._lib.seccomp_attr_set(ctx, FilterAttr.CTL_OPTIMIZE, 2), "seccomp_attr_set")
            for rule in rules:
                self.add(rule)
        except BaseException:
            self.close()
            raise

    @property
    def ctx(self) -> int:
        if self._ctx is None:
            raise SeccompError("use", errno.EBADF, "the filter was released")
        return self._ctx

    def add(self, rule: Rule) -> None:
        number = syscall_number(rule.syscall)
        array = (_ArgCmp * max(1, len(rule.args)))()
        for index, cmp in enumerate(rule.args):
            a, b = cmp.datums()
            array[index] = _ArgCmp(cmp.arg, int(cmp.op), a, b)
        _check(self._lib.seccomp_rule_add_array(self.ctx, rule.action, number, len(rule.args), array),
               "seccomp_rule_add", rule.syscall)

    def bpf(self) -> bytes:
        """The BPF program libseccomp generates for this filter (8 bytes per instruction)."""
        with tempfile.TemporaryFile() as file:
            _check(self._lib.seccomp_export_bpf(self.ctx, file.fileno()), "seccomp_export_bpf")
            file.seek(0)
            return file.read()

    def instructions(self) -> int:
        return len(self.bpf()) // 8

    def load(self, listener: bool) -> int | None:
        """Load the filter into the calling thread only (see load_program)."""
        return load_program(self.bpf(), listener)

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.seccomp_release(self._ctx)
            self._ctx = None

    def __enter__(self) -> Filter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_program(program: bytes, listener: bool) -> int | None:
    """Load a BPF program libseccomp compiled (`Filter.bpf()`) into the calling thread only (it then applies to
    the threads it creates later).

    It is loaded with seccomp(2) directly because seccomp_load() keeps one notification fd per process, and each
    thread here loads its own filter with its own listener. With `listener`, returns the new notification fd
    (SECCOMP_FILTER_FLAG_NEW_LISTENER).
    """
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    try:
        set_no_new_privs()
    except OSError as exc:
        raise SeccompError("prctl(PR_SET_NO_NEW_PRIVS)", exc.errno or 0) from None
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
    rc = _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog))
    if rc < 0:
        raise SeccompError("seccomp(SECCOMP_SET_MODE_FILTER)", ctypes.get_errno())
    return int(rc) if listener else None


class Notifications:
    """Buffers to receive and answer user notifications, allocated by libseccomp for this kernel's sizes
    (which also makes libseccomp check that the kernel supports notifications: until then it refuses them)."""

    def __init__(self) -> None:
        self._lib = lib = library()
        request, response = ctypes.POINTER(Notif)(), ctypes.POINTER(NotifResp)()
        _check(lib.seccomp_notify_alloc(ctypes.byref(request), ctypes.byref(response)), "seccomp_notify_alloc")
        self._request_pointer, self._response_pointer = request, response
        self.request = request.contents
        self.response = response.contents

    def close(self) -> None:
        self._lib.seccomp_notify_free(self._request_pointer, self._response_pointer)

    def receive(self, fd: int) -> Notif | None:
        """The next pending notification on `fd`, or None if its caller went away meanwhile."""
        ctypes.memset(ctypes.addressof(self.request), 0, ctypes.sizeof(self.request))
        rc = self._lib.seccomp_notify_receive(fd, self._request_pointer)
        if rc < 0:
            if -rc in (errno.ENOENT, errno.EINTR, errno.ECANCELED):
                return None
            raise SeccompError("seccomp_notify_receive", -rc)
        return self.request

    def respond(self, fd: int, notification_id: int, error: int = 0, allow: bool = False) -> bool:
        """Answer: run the call (`allow`) or fail it with `error`. False if the caller went away."""
        response = self.response
        response.id = notification_id
        response.val = 0
        response.error = 0 if allow else -error
        response.flags = USER_NOTIF_FLAG_CONTINUE if allow else 0
        rc = self._lib.seccomp_notify_respond(fd, self._response_pointer)
        if rc < 0:
            if -rc in (errno.ENOENT, errno.EINTR, errno.ECANCELED):
                return False
            raise SeccompError("seccomp_notify_respond", -rc)
        return True
