"""What an untrusted program can reach on the host, counted: as a container process (Docker's default seccomp
profile, as Debian ships Moby's) and as a guest of pyrovisor (the KVM exits the host kernel handles, the device
registers the VMM emulates, the system calls the VMM may make, unconfined and confined); and what the jail costs
at start-up (time to the guest's first output with and without --jail, in the same run).

Needs the profile from Debian's golang-github-docker-docker-dev (.ci/run unpacks it into build/moby/); without it
this says so and exits with 1. The confined column needs pyrovisor.confine.filters (THREAD_KINDS,
allowed_syscalls). Run as root (the jail, swtpm for the TPM device).

Run: python benchmarks/attack_surface.py [--profile FILE] [--repeats 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from io_exits import cpu_model, load_average  # noqa: E402  (a sibling script, not a package)

MOBY = Path("usr/share/gocode/src/github.com/docker/docker")
PROFILE = MOBY / "profiles/seccomp/default.json"
DEFAULT_CAPS = MOBY / "oci/caps/defaults.go"
ROOTS = (Path("/"), REPO / "build" / "moby")  # the package installed, or unpacked by .ci/run
MOBY_ARCH = {"x86_64": "amd64"}  # Go's name for the architecture, which the profile's arches use
SCMP_ARCH_X86_64 = 0xC000003E
SYSCALL_NUMBERS = 1024  # x86_64 numbers are below this (x32 numbers have bit 30 set and are not counted)


# --- 1. a container process: Moby's default profile ------------------------------------------------------------
@dataclass
class ContainerSurface:
    allowed: set[str] = field(default_factory=set)
    conditional: set[str] = field(default_factory=set)  # allowed only with certain argument values
    not_on_this_arch: set[str] = field(default_factory=set)
    capabilities: list[str] = field(default_factory=list)
    source: str = ""


def find_moby_file(relative: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    for root in ROOTS:
        if (root / relative).is_file():
            return root / relative
    sys.exit(f"attack_surface: {relative.name} not found under {', '.join(map(str, ROOTS))}: install Debian's "
             "golang-github-docker-docker-dev, or unpack it (apt-get download golang-github-docker-docker-dev && "
             "dpkg-deb -x golang-github-docker-docker-dev_*.deb build/moby), or give --profile FILE")


def default_capabilities(path: Path) -> list[str]:
    """Docker's default capability set, as Moby's oci/caps/defaults.go lists it."""
    text = path.read_text()
    body = text[text.index("DefaultCapabilities"):]
    return re.findall(r'"(CAP_[A-Z_]+)"', body[:body.index("}")])


class Seccomp:
    """libseccomp's syscall tables (the names and numbers of the host's architecture)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libseccomp.so.2")
        self.lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
        self.lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
        self.lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
        version = self.lib.seccomp_version
        version.restype = ctypes.POINTER(ctypes.c_uint * 3)
        self.version = ".".join(str(part) for part in version().contents)

    def number(self, name: str) -> int:
        return int(self.lib.seccomp_syscall_resolve_name_arch(SCMP_ARCH_X86_64, name.encode()))

    def all_names(self) -> set[str]:
        libc = ctypes.CDLL(None)
        libc.free.argtypes = [ctypes.c_void_p]
        names = set()
        for number in range(SYSCALL_NUMBERS):
            pointer = self.lib.seccomp_syscall_resolve_num_arch(SCMP_ARCH_X86_64, number)
            if pointer:
                names.add(ctypes.string_at(pointer).decode())
                libc.free(pointer)
        return names


def container_surface(profile_path: Path, caps_path: Path, seccomp: Seccomp) -> ContainerSurface:
    """The system calls Moby's default profile lets a container process make on x86_64 with Docker's default
    capabilities: entries whose includes (arches, caps, minKernel) all hold and whose excludes do not."""
    profile = json.loads(profile_path.read_text())
    caps = default_capabilities(caps_path)
    arch = MOBY_ARCH[platform.machine()]
    kernel = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    surface = ContainerSurface(capabilities=caps, source=str(profile_path))
    denied: set[str] = set()
    for entry in profile["syscalls"]:
        includes, excludes = entry.get("includes") or {}, entry.get("excludes") or {}
        if includes.get("arches") and arch not in includes["arches"]:
            continue
        if excludes.get("arches") and arch in excludes["arches"]:
            continue
        if any(cap not in caps for cap in includes.get("caps") or ()):
            continue
        if any(cap in caps for cap in excludes.get("caps") or ()):
            continue
        if includes.get("minKernel") and kernel < tuple(int(p) for p in includes["minKernel"].split(".")[:2]):
            continue
        names = set(entry["names"])
        if entry["action"] != "SCMP_ACT_ALLOW":
            denied |= names
            continue
        (surface.conditional if entry.get("args") else surface.allowed).update(names)
    surface.conditional -= surface.allowed
    for group in (surface.allowed, surface.conditional):
        group -= denied
        missing = {name for name in group if seccomp.number(name) < 0}
        surface.not_on_this_arch |= missing
        group -= missing
    return surface


# --- 2. a guest of pyrovisor ----------------------------------------------------------------------------------------
NOT_GUEST_TRIGGERED = {  # userspace exits the VMM itself causes
    "KVM_EXIT_INTR": "a signal to the vCPU thread (the VMM's kick)",
    "KVM_EXIT_IRQ_WINDOW_OPEN": "asked for by the VMM to inject an interrupt",
    "KVM_EXIT_FAIL_ENTRY": "vCPU state the VMM set that the CPU refuses",
}


def userspace_exits() -> tuple[list[str], list[str]]:
    """The KVM_EXIT_* reasons pyrovisor decodes (kvm/exits.py), split into those a guest triggers and the rest."""
    import pyrovisor.kvm.exits as exits

    source = Path(exits.__file__).read_text()
    decoded = sorted(set(re.findall(r"uapi\.(KVM_EXIT_[A-Z0-9_]+)", source)) - {"KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT"})
    return [n for n in decoded if n not in NOT_GUEST_TRIGGERED], [n for n in decoded if n in NOT_GUEST_TRIGGERED]


def read_stats(fd: int) -> dict[str, int]:
    """A KVM binary statistics fd (KVM_GET_STATS_FD): every counter's name and first value."""
    header = os.pread(fd, 24, 0)
    _flags, name_size, count, _, desc_offset, data_offset = struct.unpack("<6I", header)
    descriptor_size = 16 + name_size
    blob = os.pread(fd, count * descriptor_size, desc_offset)
    values: dict[str, int] = {}
    for index in range(count):
        raw = blob[index * descriptor_size:(index + 1) * descriptor_size]
        _, _, size, offset, _ = struct.unpack("<IhHII", raw[:16])
        name = raw[16:].split(b"\0", 1)[0].decode()
        values[name] = struct.unpack("<Q", os.pread(fd, 8, data_offset + offset))[0] if size else 0
    return values


def guest_run_stats(guest: str) -> tuple[dict[str, int], str]:
    """Run a built-in guest in this process and return its boot vCPU's KVM counters (what the host kernel did for
    it) and its console."""
    from pyrovisor.builder import build_vm
    from pyrovisor.catalog import load_catalog
    from pyrovisor.config import MachineConfig

    spec = load_catalog()[guest]
    output = bytearray()
    config = MachineConfig(kernel=spec.elf, memory_size=spec.memory_size, vcpus=1, cmdline=spec.args,
                           initrd=spec.initrd)
    with build_vm(config, output.extend) as vmm:
        vmm.run(timeout=spec.timeout)
        fd = vmm.vcpus[0].fd.get_stats_fd()
        try:
            stats = read_stats(fd)
        finally:
            os.close(fd)
    return stats, output.decode(errors="replace")


@dataclass
class DeviceSurface:
    devices: list[tuple[str, str, str]] = field(default_factory=list)  # name, kind, where
    port_ranges: int = 0
    ports: int = 0
    mmio_ranges: int = 0
    mmio_bytes: int = 0


def device_surface(work: Path) -> DeviceSurface:
    """The port and MMIO ranges a guest reaches in the OS guest with every virtio device and the TPM."""
    from pyrovisor.builder import build_vm
    from pyrovisor.catalog import load_catalog
    from pyrovisor.config import BalloonConfig, DiskConfig, MachineConfig, TpmConfig, VsockConfig

    spec = load_catalog()["os"]
    disk = work / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(kernel=spec.elf, memory_size=spec.memory_size, vcpus=1, initrd=spec.initrd,
                           disks=(DiskConfig(path=disk),), rng=True, balloon=BalloonConfig(),
                           vsock=VsockConfig(cid=3, uds_path=work / "vsock.sock"),
                           tpm=TpmConfig() if shutil.which("swtpm") else None)
    surface = DeviceSurface()
    with build_vm(config, lambda data: None) as vmm:
        for attached in vmm.devices:
            placement = attached.placement
            where = []
            if placement.port is not None:
                surface.port_ranges += 1
                surface.ports += placement.port[1]
                where.append(f"ports {placement.port[0]:#x}+{placement.port[1]}")
            if placement.mmio is not None:
                surface.mmio_ranges += 1
                surface.mmio_bytes += placement.mmio[1]
                where.append(f"MMIO {placement.mmio[0]:#x}+{placement.mmio[1]:#x}")
            surface.devices.append((attached.name, attached.kind.name, ", ".join(where)))
    return surface


def confined_syscalls() -> dict[str, frozenset[str]] | str:
    """The other half of the confinement: each VMM thread kind's allow list, or why it is not available."""
    try:
        from pyrovisor.confine import filters
    except ImportError as exc:
        return f"pyrovisor.confine.filters is not available ({exc})"
    return {kind: filters.allowed_syscalls(kind) for kind in filters.THREAD_KINDS}


# --- 3. what the jail costs at start-up -----------------------------------------------------------------------------
def first_output_s(args: list[str]) -> float:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pyrovisor", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    process.stdout.read(1)
    elapsed = time.perf_counter() - started
    process.stdout.read()
    if process.wait() != 0:
        raise SystemExit(f"attack_surface: pyrovisor {' '.join(args)} failed")
    return elapsed


def startup_cost(work: Path, repeats: int) -> dict[str, float]:
    jail = work / "jail"
    jail.mkdir()
    os.chown(jail, 65534, 65534)
    plain, filtered, jailed = [], [], []
    for _ in range(repeats):  # interleaved, so all see the same host
        plain.append(first_output_s(["run", "hello", "--seccomp", "off"]))
        filtered.append(first_output_s(["run", "hello", "--seccomp", "enforce"]))
        jailed.append(first_output_s(["run", "hello", "--seccomp", "enforce", "--jail", str(jail)]))
    return {"unconfined_ms": statistics.median(plain) * 1e3, "seccomp_ms": statistics.median(filtered) * 1e3,
            "jailed_ms": statistics.median(jailed) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, help="Moby's default seccomp profile (default.json)")
    parser.add_argument("--caps", type=Path, help="Moby's oci/caps/defaults.go (Docker's default capabilities)")
    parser.add_argument("--repeats", type=int, default=10, help="start-ups timed with and without the jail")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()

    seccomp = Seccomp()
    host = seccomp.all_names()
    container = container_surface(find_moby_file(PROFILE, args.profile), find_moby_file(DEFAULT_CAPS, args.caps),
                                  seccomp)
    guest_exits, vmm_exits = userspace_exits()
    stats, _ = guest_run_stats("chaos")
    moved = sorted(name for name, value in stats.items() if value and (
        name.endswith("exits") or name in ("insn_emulation", "pf_taken", "pf_emulate", "hypercalls")))
    confined = confined_syscalls()
    with tempfile.TemporaryDirectory(prefix="attack-surface-") as folder:
        devices = device_surface(Path(folder))
        startup = startup_cost(Path(folder), args.repeats)
    union = frozenset().union(*confined.values()) if isinstance(confined, dict) else None

    console = Console(width=170)
    console.print(f"CPU: {cpu_model()}; kernel {platform.release()}; load {load_average()}; "
                  f"libseccomp {seccomp.version}")
    table = Table(title="what an untrusted program reaches on the host directly")
    for column in ("", "container process (Docker default)", "pyrovisor guest, VMM unconfined",
                   "pyrovisor guest, VMM confined"):
        table.add_column(column)
    direct = f"{len(container.allowed)} + {len(container.conditional)} with set arguments"
    table.add_row("host system calls it may make itself", direct, "0", "0")
    table.add_row("KVM exits handled for it in the host kernel", "-",
                  f"{len(moved)} kinds of exit counted during the chaos guest", "same")
    table.add_row("userspace exits it can cause (to the VMM)", "-", str(len(guest_exits)), str(len(guest_exits)))
    table.add_row("emulated device registers", "-",
                  f"{devices.port_ranges} port ranges ({devices.ports} ports), {devices.mmio_ranges} MMIO ranges "
                  f"({devices.mmio_bytes} bytes)", "same")
    vmm_calls = "every one: " + str(len(host))
    if union is not None and isinstance(confined, dict):
        confined_calls = (f"{len(union)} (all thread kinds together); the vCPU thread, where device models run, "
                          f"{len(confined['vcpu'])}; the I/O thread {len(confined['io'])}")
    else:
        confined_calls = str(confined)
    table.add_row("host system calls after a VMM compromise", "-", vmm_calls, confined_calls)
    console.print(table)
    console.print(f"host syscall table (x86_64, libseccomp {seccomp.version}): {len(host)} names")
    console.print(f"container: {container.source}; capabilities {', '.join(container.capabilities)}; "
                  f"conditional: {', '.join(sorted(container.conditional))}; not on x86_64: "
                  f"{len(container.not_on_this_arch)}")
    console.print(f"userspace exits a guest causes: {', '.join(guest_exits)}; the VMM's own: {', '.join(vmm_exits)}")
    console.print(f"KVM counters that moved for the chaos guest: {', '.join(f'{n}={stats[n]}' for n in moved)}")
    for name, kind, where in devices.devices:
        console.print(f"  device {name} ({kind}): {where}")
    if isinstance(confined, dict):
        for kind, names in confined.items():
            console.print(f"  confined thread kind {kind}: {len(names)} system calls")
    console.print(f"start-up to the guest's first output, median of {args.repeats}: unconfined (--seccomp off) "
                  f"{startup['unconfined_ms']:.0f} ms, seccomp filters {startup['seccomp_ms']:.0f} ms "
                  f"(+{startup['seccomp_ms'] - startup['unconfined_ms']:.0f} ms), filters and jail "
                  f"{startup['jailed_ms']:.0f} ms (+{startup['jailed_ms'] - startup['unconfined_ms']:.0f} ms)")
    if args.json:
        document: dict[str, Any] = {
            "cpu": cpu_model(), "kernel": platform.release(), "host_syscalls": len(host),
            "container_allowed": sorted(container.allowed), "container_conditional": sorted(container.conditional),
            "guest_exits": guest_exits, "kvm_counters": {n: stats[n] for n in moved},
            "devices": devices.devices, "ports": devices.ports, "mmio_bytes": devices.mmio_bytes,
            "confined": {k: sorted(v) for k, v in confined.items()} if isinstance(confined, dict) else confined,
            "startup": startup,
        }
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
