"""The one place that calls ioctl(): integer and pointer forms, errors turned into KvmError."""

from __future__ import annotations

import ctypes
import fcntl
from collections.abc import Callable

from pyrovisor.errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


def ioctl_int(fd: int, request: int, argument: int, name: str) -> int:
    """An ioctl whose argument is an integer (or unused); returns the ioctl's non-negative result."""
    try:
        return fcntl.ioctl(fd, request, argument)
    except OSError as exc:
        raise KvmError(name, exc.errno or 0) from None


def raw_ioctl() -> Callable[[int, int, int | None], int]:
    """libc's ioctl through ctypes (releases the GIL; ~0.5 µs cheaper per call than fcntl.ioctl).

    Returns -1 on failure with the error in ctypes.get_errno(); for hot paths such as KVM_RUN.
    """
    function: Callable[[int, int, int | None], int] = _libc.ioctl
    return function


def ioctl_ptr(fd: int, request: int, address: int | None, name: str) -> int:
    """An ioctl whose argument is a pointer to memory we own (the GIL is released during the call)."""
    result = _libc.ioctl(fd, request, address)
    if result < 0:
        raise KvmError(name, ctypes.get_errno())
    return int(result)


def ioctl_struct(fd: int, request: int, obj: ctypes.Structure | ctypes.Array[ctypes.c_char], name: str) -> int:
    """An ioctl reading or writing a ctypes object in place."""
    return ioctl_ptr(fd, request, ctypes.addressof(obj), name)
