"""The jail: the VMM in new namespaces, pivoted into a directory holding only what it needs, unprivileged, in a cgroup."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from pyrovisor.confine.capabilities import (
    become,
    check_libc,
    die_with_parent,
    last_capability,
    missing_capabilities,
    set_no_new_privs,
)
from pyrovisor.confine.cgroup import Cgroup, CgroupLimits, host_cgroup_plan, jail_cgroup_name
from pyrovisor.errors import JailError

NOBODY = 65534  # the default jail uid and gid: nobody/nogroup
KVM_DEVICE = Path("/dev/kvm")
PROBE_VARIABLE = "PYROVISOR_JAIL_PROBE"  # tests only: the jailed VMM reports what it sees, on stderr
TMP_SIZE = "16m"  # the jail's private /tmp (its pages count against the cgroup's memory limit)

# unshare(2) and mount(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = {"mnt": CLONE_NEWNS, "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC, "net": CLONE_NEWNET, "pid": CLONE_NEWPID}
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
_SYS_PIVOT_ROOT = 155  # x86_64

# What the launcher must hold: namespaces, mounts and pivot_root (SYS_ADMIN), the change of user (SETUID,
# SETGID), emptying the bounding set (SETPCAP), the jail's /dev/kvm node and its owner (MKNOD, CHOWN).
NEEDED_CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_MKNOD", "CAP_CHOWN")
# Devices in the jail's /dev besides kvm: (name, mode); the numbers are those of the host's nodes.
PLAIN_DEVICES = (("null", 0o666), ("zero", 0o666), ("urandom", 0o666))
# Modules the VMM may import lazily whose extension modules load shared libraries: imported before the pivot.
PRELOAD = ("hashlib", "hmac", "secrets", "selectors", "socket", "json", "zlib", "lz4.frame", "zstandard",
           "pyrovisor.builder", "pyrovisor.api.server", "pyrovisor.api.vm_routes", "pyrovisor.api.terminal",
           "pyrovisor.migration.destination", "pyrovisor.migration.source", "pyrovisor.confine.seccomp",
           "pyrovisor.confine.filters")


@dataclass(frozen=True)
class Bind:
    """A host file or directory mounted into the jail at its own path, read-only unless `writable`."""

    path: Path
    writable: bool = False


@dataclass(frozen=True)
class JailConfig:
    directory: Path  # the jail's root; the directory itself is also mounted, writable, at its own path
    uid: int = NOBODY
    gid: int = NOBODY
    limits: CgroupLimits = field(default_factory=lambda: CgroupLimits(memory_bytes=2 << 30, cpus=1.0))
    binds: tuple[Bind, ...] = ()  # the VM's files
    namespaces: tuple[str, ...] = ("mnt", "pid", "net", "ipc", "uts")


@dataclass
class _Layout:
    """What the child mounts: runtime binds (Python, pyrovisor, libraries) and the VM's, merged."""

    binds: list[Bind] = field(default_factory=list)
    cwd: Path = Path("/")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


def mount(source: str | None, target: Path | str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check_libc(_libc.mount(source.encode() if source else None, os.fsencode(target), fstype.encode() if fstype else None,
                      flags, data.encode() if data else None), "mount", target)


def unshare(flags: int) -> None:
    check_libc(_libc.unshare(flags), "unshare")


def pivot_root(new_root: str, put_old: str) -> None:
    check_libc(_libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root", new_root)


# --- checks made by the launcher, before anything changes -------------------------------------------------
def check_privileges() -> None:
    missing = missing_capabilities(NEEDED_CAPABILITIES)
    if missing:
        raise JailError("confine the VMM", f"this process lacks {', '.join(missing)} (run pyrovisor as root: the "
                        "jail creates namespaces, mounts its root, makes /dev/kvm and changes user)")


def may_access(path: Path, uid: int, gid: int, write: bool = False) -> bool:
    """Whether `uid`/`gid` (no supplementary groups, no capabilities) may read (and write) `path`; directories
    also need search permission. The path's own mode counts: in the jail its parents are the jail's."""
    info = path.stat()
    shift = 6 if info.st_uid == uid else 3 if info.st_gid == gid else 0
    bits = info.st_mode >> shift & 0o7
    wanted = 0o4 | (0o2 if write else 0) | (0o1 if stat.S_ISDIR(info.st_mode) else 0)
    return bits & wanted == wanted


def check_directory(config: JailConfig) -> None:
    """The jail directory exists (or is created, owned by the jail's user, mode 0700) and that user may write in
    it: the API socket, snapshots and Unix sockets the VMM makes go there."""
    directory = config.directory
    if not directory.exists():
        if not directory.parent.is_dir():
            raise JailError("use the jail directory", f"{directory.parent} does not exist")
        directory.mkdir(mode=0o700)
        os.chown(directory, config.uid, config.gid)
    if not directory.is_dir():
        raise JailError("use the jail directory", f"{directory} is not a directory")
    if directory == Path("/"):
        raise JailError("use the jail directory", "/ cannot be the jail")
    if not may_access(directory, config.uid, config.gid, write=True):
        raise JailError("use the jail directory", f"uid {config.uid} (gid {config.gid}) cannot write in {directory}: "
                        f"chown {config.uid}:{config.gid} {directory}, or choose --jail-uid/--jail-gid")


def check_binds(config: JailConfig) -> None:
    """Every file the VM needs exists and the jail's user may use it as asked (its mode, not its parents')."""
    for bind in config.binds:
        if not bind.path.exists():
            raise JailError("put the VM's files in the jail", f"{bind.path} does not exist")
        for path in _walk(bind.path):
            if not may_access(path, config.uid, config.gid, write=bind.writable):
                need = "read and write" if bind.writable else "read"
                raise JailError("put the VM's files in the jail", f"uid {config.uid} (gid {config.gid}) cannot {need} "
                                f"{path}: give it access (chown or chmod), or choose --jail-uid/--jail-gid")


def _walk(path: Path, limit: int = 10_000) -> Iterator[Path]:
    yield path
    if path.is_dir():
        for count, (folder, folders, files) in enumerate(os.walk(path)):
            if count > limit:
                return
            for name in folders + files:
                yield Path(folder) / name


def inside(path: Path, directory: Path) -> bool:
    return path.resolve() == directory.resolve() or directory.resolve() in path.resolve().parents


# --- the runtime the jailed interpreter needs ----------------------------------------------------------------
def preload(modules: Iterable[str] = PRELOAD) -> None:
    """Import what the VMM imports lazily and what loads shared libraries, while the host's files are there."""
    import importlib

    for name in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def runtime_binds() -> list[Bind]:
    """Python's installation, the directories of imported packages outside it (pyrovisor's own), and the
    directories of every shared library the process has mapped, all read-only."""
    paths: set[Path] = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        paths.add(Path(prefix))
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and name != "__main__":  # a script's own folder is not the runtime
            paths.add(_package_root(Path(file), module.__name__))
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/") and not parts[5].rstrip().endswith("(deleted)"):
                mapped = Path(parts[5].rstrip())
                if mapped.is_file() and not mapped.is_relative_to("/dev"):
                    paths.add(mapped.parent)
    return [Bind(path) for path in paths if path.exists()]


def _package_root(file: Path, name: str) -> Path:
    """The sys.path entry a module was imported from: its file's folder, up one per dot of its name."""
    root = file.parent
    depth = name.count(".") + (1 if file.name == "__init__.py" else 0)
    for _ in range(depth):
        root = root.parent
    return root


def merge_binds(binds: Iterable[Bind]) -> list[Bind]:
    """Shortest paths first, without those already visible through a bind above them with the same access."""
    kept: list[Bind] = []
    for bind in sorted({Bind(b.path.resolve(), b.writable) for b in binds},
                       key=lambda b: (len(b.path.parts), str(b.path), not b.writable)):
        covered = any(bind.path == k.path or k.path in bind.path.parents for k in kept
                      if k.writable or not bind.writable)
        if not covered:
            kept.append(bind)
    return kept


# --- entering the jail ----------------------------------------------------------------------------------------
def enter(config: JailConfig, announce: Callable[[str], None] | None = None) -> int | None:
    """Confine what follows. In the launcher, wait for the jailed process and return its exit code; in the
    jailed process (PID 1 of new namespaces, unprivileged, in the cgroup), return None to carry on.

    The launcher stays outside, unconfined, only to pass on SIGTERM, SIGHUP and SIGINT, to report a death by the
    cgroup's OOM killer, and to remove the cgroup afterwards."""
    directory = config.directory.absolute()
    config = JailConfig(directory, config.uid, config.gid, config.limits, config.binds, config.namespaces)
    check_privileges()
    if not KVM_DEVICE.exists():
        raise JailError("give the jail /dev/kvm", f"{KVM_DEVICE} does not exist on this host")
    check_directory(config)
    check_binds(config)
    preload()
    layout = _Layout(merge_binds([*runtime_binds(), *config.binds, Bind(directory.resolve(), writable=True)]),
                     Path.cwd())
    last_cap = last_capability()
    cgroup = Cgroup(host_cgroup_plan(), jail_cgroup_name(), config.limits)
    try:
        if announce is not None:
            announce(f"pyrovisor: jail {directory}: uid {config.uid} gid {config.gid}, namespaces "
                     f"{' '.join(config.namespaces)}, {cgroup.describe()}")
        sys.stdout.flush()
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        if "pid" in config.namespaces:
            unshare(CLONE_NEWPID)  # for the child: it is PID 1 of the new namespace
        child = os.fork()
        if child == 0:
            os.close(read_end)
            try:
                _confine(config, layout, cgroup, last_cap)
            except BaseException as exc:  # told to the launcher, which reports it as the one error line
                with contextlib.suppress(OSError):
                    os.write(write_end, str(exc).encode(errors="replace")[:4000])
                os._exit(1)
            os.close(write_end)
            cgroup.directories = {}  # the launcher removes it
            _exit_on_stop_signals()
            if os.environ.get(PROBE_VARIABLE):
                _probe()
            return None
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            failure = pipe.read().decode(errors="replace")
        with _forward_signals(child):
            _, status = os.waitpid(child, 0)
        if failure:
            raise JailError("set up the jail", failure)
        return _exit_code(status, cgroup)
    finally:
        if cgroup.directories:
            cgroup.remove()


def _exit_code(status: int, cgroup: Cgroup) -> int:
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return code
    number = -code
    if number == signal.SIGKILL and cgroup.oom_kills() > 0:
        peak = cgroup.peak_memory()
        peak_text = f", peak {peak / 2**20:.1f} MiB" if peak is not None else ""
        raise JailError("keep the VM running", f"the kernel's OOM killer stopped the VMM: its cgroup reached its "
                        f"memory limit of {cgroup.limits.memory_bytes / 2**20:g} MiB{peak_text} (--jail-memory)")
    return 128 + number


@contextlib.contextmanager
def _forward_signals(child: int) -> Iterator[None]:
    def forward(number: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, number)

    forwarded = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {number: signal.signal(number, forward) for number in forwarded}
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


def _exit_on_stop_signals() -> None:
    """PID 1 of a namespace ignores signals it has no handler for: give SIGTERM and SIGHUP their usual effect
    (drive() installs its own, clean stop, while the guest runs)."""
    def stop(number: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + number)

    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, stop)


def _confine(config: JailConfig, layout: _Layout, cgroup: Cgroup, last_cap: int) -> None:
    """In the child: cgroup, namespaces, the new root, then no way back to privilege."""
    cgroup.join()
    flags = 0
    for name in config.namespaces:
        if name != "pid":
            flags |= NAMESPACES[name]
    unshare(flags)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    root = config.directory.resolve()
    original = os.open(root, os.O_PATH | os.O_DIRECTORY)  # the directory as it is, under the tmpfs to come
    mount("tmpfs", root, "tmpfs", MS_NOSUID, "mode=0755,size=1m")
    _make_devices(root, config)
    for folder in ("proc", "tmp"):
        (root / folder).mkdir(mode=0o755)
    mount("tmpfs", root / "tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"mode=1777,size={TMP_SIZE},uid={config.uid},gid={config.gid}")
    for bind in layout.binds:  # after /tmp: the jail directory or a file may be under it
        source = f"/proc/self/fd/{original}" if bind.path == root else str(bind.path)
        _bind(source, root / bind.path.relative_to("/"), bind.writable)
    os.close(original)
    try:
        mount("proc", root / "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "subset=pid")
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        mount("proc", root / "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # kernels before 5.8
    cwd = root / layout.cwd.relative_to("/")
    if not cwd.exists():
        with contextlib.suppress(OSError):
            cwd.mkdir(parents=True, mode=0o755)
    os.chdir(root)
    pivot_root(".", ".")  # pivot_root(2): the old root ends up on top of the new one ...
    check_libc(_libc.umount2(b".", MNT_DETACH), "umount2 of the old root")  # ... and goes
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    with contextlib.suppress(OSError):
        os.chdir(layout.cwd)  # relative paths given on the command line mean what they meant
    set_no_new_privs()
    become(config.uid, config.gid, last_cap)
    die_with_parent(signal.SIGKILL)


def _make_devices(root: Path, config: JailConfig) -> None:
    dev = root / "dev"
    dev.mkdir(mode=0o755)
    kvm = dev / "kvm"
    os.mknod(kvm, stat.S_IFCHR | 0o600, os.stat(KVM_DEVICE).st_rdev)
    os.chown(kvm, config.uid, config.gid)  # like Firecracker's jailer: the node belongs to the jailed user
    for name, mode in PLAIN_DEVICES:
        node = dev / name
        os.mknod(node, stat.S_IFCHR | mode, os.stat(f"/dev/{name}").st_rdev)
        os.chmod(node, mode)


def _bind(source: str, target: Path, writable: bool) -> None:
    is_dir = os.path.isdir(source)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if is_dir:
            target.mkdir(mode=0o755)
        else:
            target.touch(mode=0o644)
    mount(source, target, None, MS_BIND)  # not MS_REC: what is mounted below the source (the jail's root) stays out
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY)
    mount(None, target, None, flags)


def _probe() -> None:
    """Tests only: what the jailed process sees, as one line on stderr."""
    seen = {
        "root": sorted(os.listdir("/")),
        "processes": sorted(int(name) for name in os.listdir("/proc") if name.isdigit()),
        "host_files": [path for path in ("/etc", "/home", "/var", "/boot", "/usr/bin", "/sbin") if os.path.exists(path)],
        "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
    }
    print(f"pyrovisor: jail probe: {json.dumps(seen)}", file=sys.stderr, flush=True)
