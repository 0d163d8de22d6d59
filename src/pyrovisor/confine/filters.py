"""The system calls each kind of VMM thread may make once set-up is done, with their argument filters."""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.confine.seccomp import ACT_NOTIFY, ArgCmp, Compare, Filter, Rule, act_errno
from pyrovisor.errors import ConfigError
from pyrovisor.kvm import uapi
from pyrovisor.memory import userfault

THREAD_KINDS: tuple[str, ...] = ("vcpu", "io", "api", "migration", "throttle", "vmm", "console", "wss")

PROT_EXEC = 0x4
FIONBIO = 0x5421
TCGETS = 0x5401
TCSETS, TCSETSW, TCSETSF = 0x5402, 0x5403, 0x5404  # tcsetattr: TCSANOW, TCSADRAIN, TCSAFLUSH
CLONE_THREAD = 0x10000
LOW_32 = 0xFFFFFFFF


def _allow(*names: str) -> tuple[Rule, ...]:
    return tuple(Rule(name) for name in names)


def _ioctls(*requests: int) -> tuple[Rule, ...]:
    """`ioctl` with one of these request numbers only (compared on the low 32 bits: the kernel's cmd is an int)."""
    return tuple(Rule("ioctl", (ArgCmp(1, Compare.MASKED_EQ, request, LOW_32),)) for request in requests)


def _sockets(*families: int) -> tuple[Rule, ...]:
    return tuple(Rule("socket", (ArgCmp(0, Compare.EQ, family),)) for family in families)


# --- what every Python thread needs ---------------------------------------------------------------------
# The interpreter's locks and the GIL are futexes; threads give up the CPU with sched_yield.
_LOCKS = _allow("futex", "sched_yield")
# The allocator (pymalloc arenas, malloc, thread stacks) maps, grows, returns and advises memory; never executable.
_MEMORY = (
    Rule("mmap", (ArgCmp(2, Compare.MASKED_EQ, 0, PROT_EXEC),)),
    Rule("mprotect", (ArgCmp(2, Compare.MASKED_EQ, 0, PROT_EXEC),)),
    *_allow("munmap", "mremap", "madvise", "brk"),
)
# Any thread may take a process signal (SIGTERM, SIGHUP, the kick): Python's C handler runs, then the kernel
# returns through rt_sigreturn; an interrupted sleep restarts with restart_syscall.
_SIGNALS = _allow("rt_sigprocmask", "rt_sigreturn", "restart_syscall")
# Time (when the vDSO is not used) and sleeps (time.sleep, timed waits).
_TIME = _allow("clock_gettime", "gettimeofday", "clock_nanosleep", "nanosleep")
# logging writes records to stderr (and asks for the pid); a thread ends with exit.
_LOG_AND_EXIT = _allow("write", "getpid", "gettid", "exit")
_PYTHON = _LOCKS + _MEMORY + _SIGNALS + _TIME + _LOG_AND_EXIT

# Creating threads: glibc tries clone3 first, whose flags sit in memory a filter cannot read. Answer ENOSYS
# (glibc then uses clone) and allow clone only with CLONE_THREAD: threads, never processes.
_THREADS = (
    Rule("clone", (ArgCmp(0, Compare.MASKED_EQ, CLONE_THREAD, CLONE_THREAD),)),
    Rule("clone3", action=act_errno(errno.ENOSYS)),
    *_allow("set_robust_list", "rseq"),
)


def _kick() -> tuple[Rule, ...]:
    """tgkill with the vCPU kick signal only (pause, resume, stop kick vCPU threads out of KVM_RUN)."""
    return (Rule("tgkill", (ArgCmp(2, Compare.EQ, int(signal.SIGRTMIN)),)),)


# --- KVM requests ---------------------------------------------------------------------------------------------
_VCPU_STATE_GET = (uapi.KVM_GET_REGS, uapi.KVM_GET_SREGS, uapi.KVM_GET_FPU, uapi.KVM_GET_XSAVE, uapi.KVM_GET_XCRS,
                   uapi.KVM_GET_MSRS, uapi.KVM_GET_MP_STATE, uapi.KVM_GET_LAPIC, uapi.KVM_GET_VCPU_EVENTS,
                   uapi.KVM_GET_DEBUGREGS, uapi.KVM_GET_TSC_KHZ, uapi.KVM_GET_CPUID2)
_VM_STATE_GET = (uapi.KVM_GET_IRQCHIP, uapi.KVM_GET_CLOCK, uapi.KVM_GET_PIT2)
_DIRTY = (uapi.KVM_GET_DIRTY_LOG, uapi.KVM_CLEAR_DIRTY_LOG, uapi.KVM_RESET_DIRTY_RINGS)
_INTERRUPTS = (uapi.KVM_IRQ_LINE, uapi.KVM_SIGNAL_MSI)


@dataclass(frozen=True)
class ThreadPolicy:
    """What one kind of thread may do: its rules, and why the kind exists. `preload` names the modules its code
    imports lazily: they are imported before the filter loads, since loading a C extension maps executable pages
    ("?name" is an optional dependency, skipped when not installed; "name@other" is imported only when module
    `other` is already loaded: a feature this VM uses)."""

    kind: str
    description: str
    rules: tuple[Rule, ...]
    preload: tuple[str, ...] = ()
    kills_children: bool = False  # kill, of the children that exist when the filter loads (child_rules)


POLICIES: dict[str, ThreadPolicy] = {
    policy.kind: policy for policy in (
        ThreadPolicy("vcpu", "runs KVM_RUN and handles port and MMIO exits in Python", (
            *_PYTHON, *_kick(),
            # KVM_RUN; completing pending I/O and reading registers for an error report; interrupt lines the
            # UART raises on this thread; the dirty ring harvested when it fills.
            *_ioctls(uapi.KVM_RUN, uapi.KVM_GET_REGS, uapi.KVM_GET_SREGS, *_INTERRUPTS, *_DIRTY),
            # virtio-balloon: the driver turning statistics on arms the device's timerfd (from an MMIO write).
            *_allow("timerfd_settime"),
            # The vTPM: the guest's write to the CRB start register sends the command to swtpm and waits for the
            # answer on this thread.
            *_allow("sendto", "recvfrom", "poll", "pread64"),
            # A device started by the driver (virtio status) adds its sources to the event loop, directly on
            # the loop's epoll when the loop thread is not running (the VM stopping).
            *_allow("epoll_ctl"),
        # Write monitoring disassembles the trapping instruction here: capstone's library, loaded beforehand.
        ), preload=("?capstone@pyrovisor.introspect.write_monitor",)),
        ThreadPolicy("io", "the event loop: doorbells (ioeventfd), backends (tap, disk files, vsock sockets)", (
            *_PYTHON,
            # epoll over the sources; eventfds and taps are read and written.
            *_allow("epoll_wait", "epoll_pwait", "epoll_ctl", "read", "readv", "writev"),
            # virtio-blk: reads, writes and flushes of the disk image.
            *_allow("pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "fsync", "fdatasync", "lseek",
                    "fstat"),
            # virtio-vsock: connections to the host's Unix sockets; virtio-rng: the kernel's random bytes.
            *_sockets(socket.AF_UNIX),
            *_allow("connect", "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown", "close", "getrandom",
                    "getsockopt", "setsockopt", "fcntl", "accept4", "getsockname"),
            # virtio-balloon's statistics timer (a timerfd) is re-armed here.
            *_allow("timerfd_settime"),
            *_ioctls(*_INTERRUPTS, FIONBIO),
        )),
        ThreadPolicy("api", "the control API server and its per-connection threads (and what they start)", (
            *_PYTHON, *_THREADS, *_kick(),
            # Accepting and serving connections on the Unix socket.
            *_allow("accept", "accept4", "recvfrom", "sendto", "recvmsg", "sendmsg", "shutdown", "close", "poll",
                    "select", "pselect6", "getsockopt", "setsockopt", "fcntl", "getsockname", "getpeername"),
            # Snapshots: create the directory and files, write, sync, rename; read the PSK and state files.
            *_allow("openat", "read", "pread64", "pwrite64", "lseek", "fstat", "newfstatat", "statx", "mkdir",
                    "mkdirat", "rename", "renameat", "renameat2", "unlink", "unlinkat", "fsync", "fdatasync",
                    "ftruncate", "fallocate", "getdents64", "readlink", "getcwd", "umask", "fchmod", "chmod"),
            # Migration and the TPM: sockets to the destination and to swtpm; nonces.
            *_sockets(socket.AF_UNIX, socket.AF_INET, socket.AF_INET6),
            *_allow("connect", "bind", "getrandom"),
            # Saving the VM (parked vCPUs) and dirty tracking for diffs and migration (turning dirty logging on
            # and off sets the memslots' flags); host facts in snapshot metadata.
            *_ioctls(*_VCPU_STATE_GET, *_VM_STATE_GET, *_DIRTY, uapi.KVM_RUN, *_INTERRUPTS,
                     uapi.KVM_SET_USER_MEMORY_REGION),
            *_allow("uname", "preadv2", "pwritev2", "sched_getaffinity", "timerfd_settime"),
            # Python's socket timeouts switch blocking mode with FIONBIO; open() asks isatty (TCGETS).
            *_ioctls(FIONBIO, TCGETS),
        ), preload=("pyrovisor.snapshot.take", "pyrovisor.migration.source", "pyrovisor.migration.policy",
                    "pyrovisor.api.balloon_routes")),
        ThreadPolicy("migration", "the pre-copy engine: dirty pages to the destination", (
            *_PYTHON, *_THREADS, *_kick(),
            *_sockets(socket.AF_UNIX, socket.AF_INET, socket.AF_INET6),
            *_allow("connect", "sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown", "close", "poll", "read",
                    "getsockopt", "setsockopt", "fcntl", "getrandom", "getsockname", "getpeername", "fstat",
                    "lseek", "openat", "newfstatat"),
            *_ioctls(*_VCPU_STATE_GET, *_VM_STATE_GET, *_DIRTY, uapi.KVM_RUN, uapi.KVM_SET_USER_MEMORY_REGION,
                     FIONBIO, TCGETS),
            *_allow("uname", "fsync"),
        )),
        ThreadPolicy("throttle", "auto-converge: duty-cycle holds of the vCPUs", (
            *_PYTHON, *_kick(),
        )),
        ThreadPolicy("vmm", "the command's main thread once the VM's threads run: waits, then stops and releases the "
                     "VM and exits", (
            *_PYTHON, *_THREADS, *_kick(),
            # Signal handlers put back; the terminal's mode restored; child processes (swtpm, the fault server)
            # waited for (kill: only those that exist when the filter loads, see child_rules).
            *_allow("rt_sigaction", "wait4", "waitid", "exit_group"),
            *_ioctls(TCGETS, TCSETS, TCSETSW, TCSETSF, FIONBIO),
            # Releasing the VM: fds, sockets (the API's, swtpm's control channel), the event loop's sources,
            # temporary directories and sockets removed; an error report reads the source of a traceback.
            *_allow("close", "shutdown", "sendto", "recvfrom", "sendmsg", "recvmsg", "poll", "select", "pselect6",
                    "epoll_ctl", "unlink", "unlinkat", "rmdir", "openat", "read", "pread64", "lseek", "fstat",
                    "newfstatat", "statx", "getdents64", "readlink", "getcwd", "fcntl"),
            # Releasing devices' doorbells and interrupt routes (ioeventfd, irqfd deassigned); memory slots removed
            # (the dirty log's flags first).
            *_ioctls(uapi.KVM_IOEVENTFD, uapi.KVM_IRQFD, uapi.KVM_SET_USER_MEMORY_REGION, *_DIRTY),
        ), kills_children=True),
        ThreadPolicy("console", "the keyboard: stdin to the guest's UART", (
            *_PYTHON, *_kick(),
            *_allow("select", "pselect6", "poll", "read"),
            *_ioctls(*_INTERRUPTS),  # the UART's interrupt line, raised by a key
        )),
        ThreadPolicy("wss", "the working-set estimator: arms and disarms userfaultfd samples; the write monitor's "
                     "uffd-mode record reader", (
            *_PYTHON, *_kick(),
            # The write monitor's uffd mode (introspect/write_monitor_uffd.py): its fault server registers and
            # protects the pages itself, in its own process; this thread only receives the records (recvfrom) and
            # appends them to the watches' log files (write).
            # Registering sampled pages with userfaultfd (the fault server process answers the faults), putting
            # pages back; talking to the fault server.
            *_ioctls(userfault.UFFDIO_REGISTER, userfault.UFFDIO_UNREGISTER, userfault.UFFDIO_COPY,
                     userfault.UFFDIO_ZEROPAGE, userfault.UFFDIO_WAKE),
            *_allow("read", "close", "sendmsg", "recvmsg", "sendto", "recvfrom", "poll"),
        )),
    )
}


def policy(kind: str) -> ThreadPolicy:
    try:
        return POLICIES[kind]
    except KeyError:
        raise ConfigError("thread kind", kind, f"expected one of {', '.join(THREAD_KINDS)}") from None


def channel_rules(channel_fd: int) -> tuple[Rule, ...]:
    """sendmsg on the supervisor channel only: a thread hands its new listener over, then closes it."""
    return (Rule("sendmsg", (ArgCmp(0, Compare.EQ, channel_fd),)), Rule("close"))


def child_rules() -> tuple[Rule, ...]:
    """kill, of this process's children that exist now only (swtpm, the working-set fault server, the seccomp
    supervisor): never of another process on the host."""
    children: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            text = Path(f"/proc/self/task/{task}/children").read_text(encoding="ascii")
        except OSError:
            continue
        children.update(int(pid) for pid in text.split())
    return tuple(Rule("kill", (ArgCmp(0, Compare.EQ, pid),)) for pid in sorted(children))


def allowed_syscalls(kind: str) -> frozenset[str]:
    """Names of the system calls a `kind` thread may make (argument-filtered ones included)."""
    names = {rule.syscall for rule in policy(kind).rules if rule.action != _REFUSED_QUIETLY}
    if policy(kind).kills_children:
        names.add("kill")
    return frozenset(names | {rule.syscall for rule in channel_rules(-1)})


def argument_filtered(kind: str) -> frozenset[str]:
    names = {rule.syscall for rule in policy(kind).rules if rule.args}
    return frozenset(names | ({"kill"} if policy(kind).kills_children else set()))


_REFUSED_QUIETLY = act_errno(errno.ENOSYS)


def build_filter(kind: str, default_action: int = ACT_NOTIFY, extra: Iterable[Rule] = ()) -> Filter:
    """The libseccomp filter of `kind`: its rules, then `default_action` for everything else. Signals go only to
    threads of this process (tgkill's first argument is the caller's own pid, read now)."""
    own = ArgCmp(0, Compare.EQ, os.getpid())
    children = child_rules() if policy(kind).kills_children else ()
    rules = [Rule(rule.syscall, (own, *rule.args), rule.action) if rule.syscall == "tgkill" else rule
             for rule in (*policy(kind).rules, *children, *extra)]
    return Filter(default_action, _dedupe(rules))


def _dedupe(rules: Iterable[Rule]) -> list[Rule]:
    """A plain allow makes argument rules of the same call pointless (libseccomp refuses mixing them)."""
    ordered = list(dict.fromkeys(rules))
    plain = {rule.syscall for rule in ordered if not rule.args}
    return [rule for rule in ordered if not rule.args or rule.syscall not in plain]


@dataclass(frozen=True)
class FilterSize:
    kind: str
    syscalls: int  # system calls allowed (argument-filtered ones included)
    argument_rules: int  # rules with argument comparisons
    bpf_instructions: int  # length of the BPF program libseccomp generates


def filter_size(kind: str) -> FilterSize:
    rules = _dedupe(policy(kind).rules)
    kill_rules = 1 if policy(kind).kills_children else 0
    with build_filter(kind, extra=channel_rules(99)) as compiled:
        instructions = compiled.instructions()
    return FilterSize(kind, len(allowed_syscalls(kind)), sum(1 for rule in rules if rule.args) + kill_rules,
                      instructions)
