"""Process privileges through ctypes: capability sets, the bounding set, no_new_privs, the parent-death signal."""

from __future__ import annotations

import ctypes
import enum
import os
from dataclasses import dataclass
from pathlib import Path

# capabilities(7): the bit numbers the jail asks for or reports.
CAP_NAMES: dict[int, str] = {
    0: "CAP_CHOWN", 1: "CAP_DAC_OVERRIDE", 2: "CAP_DAC_READ_SEARCH", 3: "CAP_FOWNER", 4: "CAP_FSETID",
    5: "CAP_KILL", 6: "CAP_SETGID", 7: "CAP_SETUID", 8: "CAP_SETPCAP", 9: "CAP_LINUX_IMMUTABLE",
    10: "CAP_NET_BIND_SERVICE", 11: "CAP_NET_BROADCAST", 12: "CAP_NET_ADMIN", 13: "CAP_NET_RAW",
    14: "CAP_IPC_LOCK", 15: "CAP_IPC_OWNER", 16: "CAP_SYS_MODULE", 17: "CAP_SYS_RAWIO", 18: "CAP_SYS_CHROOT",
    19: "CAP_SYS_PTRACE", 20: "CAP_SYS_PACCT", 21: "CAP_SYS_ADMIN", 22: "CAP_SYS_BOOT", 23: "CAP_SYS_NICE",
    24: "CAP_SYS_RESOURCE", 25: "CAP_SYS_TIME", 26: "CAP_SYS_TTY_CONFIG", 27: "CAP_MKNOD", 28: "CAP_LEASE",
    29: "CAP_AUDIT_WRITE", 30: "CAP_AUDIT_CONTROL", 31: "CAP_SETFCAP", 32: "CAP_MAC_OVERRIDE",
    33: "CAP_MAC_ADMIN", 34: "CAP_SYSLOG", 35: "CAP_WAKE_ALARM", 36: "CAP_BLOCK_SUSPEND", 37: "CAP_AUDIT_READ",
    38: "CAP_PERFMON", 39: "CAP_BPF", 40: "CAP_CHECKPOINT_RESTORE",
}
CAP_BY_NAME = {name: number for number, name in CAP_NAMES.items()}

# prctl(2) options
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = 126  # x86_64


class CapSet(enum.Enum):
    """The lines of /proc/PID/status that hold a capability set."""

    INHERITABLE = "CapInh"
    PERMITTED = "CapPrm"
    EFFECTIVE = "CapEff"
    BOUNDING = "CapBnd"
    AMBIENT = "CapAmb"


@dataclass(frozen=True)
class ProcessPrivileges:
    """What /proc/PID/status says about a process's identity and privileges."""

    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]
    groups: tuple[int, ...]
    capabilities: dict[CapSet, int]
    no_new_privs: bool
    seccomp_mode: int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def check_libc(result: int, what: str, path: object = None) -> None:
    """OSError (with errno's text, and `path` when given) if a libc call through ctypes returned < 0."""
    if result < 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}", None if path is None else str(path))


def prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> int:
    result: int = _libc.prctl(option, arg2, arg3, 0, 0)
    check_libc(result, what)
    return result


def privileges(pid: int | str = "self") -> ProcessPrivileges:
    """The identity and privileges of process `pid` as the kernel reports them."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ProcessPrivileges(
        uids=tuple(int(part) for part in fields["Uid"].split()),
        gids=tuple(int(part) for part in fields["Gid"].split()),
        groups=tuple(int(part) for part in fields.get("Groups", "").split()),
        capabilities={kind: int(fields[kind.value], 16) for kind in CapSet},
        no_new_privs=fields.get("NoNewPrivs") == "1",
        seccomp_mode=int(fields.get("Seccomp", "0")),
    )


def capability_names(mask: int) -> list[str]:
    return [CAP_NAMES.get(bit, f"capability {bit}") for bit in range(64) if mask >> bit & 1]


def missing_capabilities(needed: tuple[str, ...], pid: int | str = "self") -> list[str]:
    """Which of the capabilities named in `needed` the process does not hold in its effective set."""
    effective = privileges(pid).capabilities[CapSet.EFFECTIVE]
    return [name for name in needed if not effective >> CAP_BY_NAME[name] & 1]


def last_capability() -> int:
    """The highest capability this kernel knows (read before leaving the host's /proc)."""
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return max(CAP_NAMES)


def drop_bounding_set(last_cap: int) -> None:
    """Remove every capability from the bounding set, so no later execve can regain one (needs CAP_SETPCAP)."""
    for bit in range(last_cap + 1):
        prctl(PR_CAPBSET_DROP, bit, what=f"PR_CAPBSET_DROP {CAP_NAMES.get(bit, bit)}")


def clear_capabilities() -> None:
    """Empty the ambient, effective, permitted and inheritable sets."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="PR_CAP_AMBIENT_CLEAR_ALL")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check_libc(_libc.syscall(_SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)), "capset")


def set_no_new_privs() -> None:
    """No execve may grant privileges again: set-user-ID bits and file capabilities are ignored from now on."""
    prctl(PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")


def die_with_parent(signal_number: int) -> None:
    """Get `signal_number` when the parent exits (cleared by a change of user: call it after dropping)."""
    prctl(PR_SET_PDEATHSIG, signal_number, what="PR_SET_PDEATHSIG")


def become(uid: int, gid: int, last_cap: int) -> None:
    """Drop to `uid`/`gid` with no supplementary groups and no capabilities in any set, bounding set included.

    The bounding set goes first (dropping it needs CAP_SETPCAP); setuid from 0 then empties the permitted and
    effective sets, and the explicit capset leaves nothing even for a jail that keeps uid 0."""
    drop_bounding_set(last_cap)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    clear_capabilities()
