"""MachineConfig: what a VM is made of, validated before anything touches KVM."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.arch.x86_64.layout import (
    CMDLINE_MAX,
    MAX_MEMORY,
    MAX_VCPUS,
    MIN_MEMORY,
    GiB,
    KiB,
    MiB,
    ram_ranges,
)
from pyrovisor.errors import ConfigError

DEFAULT_MEMORY = 64 * MiB
MEMORY_GRANULE = 2 * MiB  # RAM comes in 2 MiB pages (the boot page tables map it with them)
MIN_DIRTY_RING_ENTRIES = 256  # KVM needs at least one page of 16-byte entries


@dataclass(frozen=True)
class DiskConfig:
    """A virtio-blk disk on a raw host file (or block device)."""

    path: Path
    read_only: bool = False
    serial: str = ""  # what the guest's GET_ID sees (at most 20 bytes); default: the file name


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net interface on a host tap device."""

    tap: str
    mac: str = ""  # 52:54:00:xx:xx:xx; default: derived from the tap's name


@dataclass(frozen=True)
class VsockConfig:
    """A virtio-vsock device in Firecracker's hybrid form: guest streams meet host Unix sockets at uds_path."""

    cid: int
    uds_path: Path


@dataclass(frozen=True)
class BalloonConfig:
    """A virtio-balloon device: the host sets a target, the guest gives that much memory back."""

    stats_interval_s: float = 1.0  # how often the guest's memory statistics are asked for; 0: only on request
    deflate_on_oom: bool = True  # the guest may take pages back from the balloon when it runs out of memory


@dataclass(frozen=True)
class TpmConfig:
    """A TPM 2.0 (CRB interface) backed by swtpm; the VMM measures the boot into it."""

    state_dir: Path | None = None  # swtpm's state (keys, NV) kept across runs; default: a private temporary one


BOOT_PYROVISOR = "pyrovisor"  # pyrovisor's own protocol: ELF64, entered in long mode (docs/boot-protocol.md)
BOOT_MULTIBOOT = "multiboot"  # Multiboot 1, as QEMU's -kernel runs it: 32-bit protected mode, QEMU's devices
BOOT_PROTOCOLS = (BOOT_PYROVISOR, BOOT_MULTIBOOT)


@dataclass(frozen=True)
class ModuleConfig:
    """A Multiboot module: a file placed in guest memory, announced with its string (path and arguments)."""

    path: Path
    args: str = ""


@dataclass(frozen=True)
class MachineConfig:
    kernel: Path
    memory_size: int = DEFAULT_MEMORY
    vcpus: int = 1
    cmdline: str = ""
    initrd: Path | None = None
    huge_pages: bool = True
    shared_memory: bool = False  # memfd backing (needed to share guest RAM with another process)
    dirty_ring_entries: int = 0  # per-vCPU dirty ring for dirty tracking; 0: KVM's dirty bitmap
    disks: tuple[DiskConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    rng: bool = False
    vsock: VsockConfig | None = None
    balloon: BalloonConfig | None = None
    tpm: TpmConfig | None = None
    boot_protocol: str = BOOT_PYROVISOR
    modules: tuple[ModuleConfig, ...] = ()  # Multiboot modules after the initrd (which is module 0 when given)
    stealth: bool = False  # hide the hypervisor from the guest where KVM allows (arch/x86_64/stealth.py)

    def validate(self) -> None:
        check_memory_size(self.memory_size, format_size(self.memory_size))
        ram_ranges(self.memory_size)
        check_vcpu_count(self.vcpus)
        if len(self.cmdline.encode()) > CMDLINE_MAX:
            raise ConfigError("command line", self.cmdline[:40] + "...", f"longer than {CMDLINE_MAX} bytes")
        if "\0" in self.cmdline:
            raise ConfigError("command line", self.cmdline, "contains a NUL character")
        check_dirty_ring_entries(self.dirty_ring_entries)
        check_virtio_devices(self)
        check_boot_protocol(self)
        if self.tpm is not None and self.tpm.state_dir is not None and not self.tpm.state_dir.is_dir():
            raise ConfigError("tpm state directory", str(self.tpm.state_dir), "is not a directory")


def check_boot_protocol(config: MachineConfig) -> None:
    """Multiboot machines have QEMU's legacy devices only; modules belong to Multiboot."""
    if config.boot_protocol not in BOOT_PROTOCOLS:
        raise ConfigError("boot protocol", config.boot_protocol, f"expected one of {', '.join(BOOT_PROTOCOLS)}")
    if config.boot_protocol != BOOT_MULTIBOOT:
        if config.modules:
            raise ConfigError("module", str(config.modules[0].path), "modules are for Multiboot kernels")
        return
    if config.disks or config.nets or config.rng or config.vsock is not None or config.balloon is not None:
        raise ConfigError("boot protocol", config.boot_protocol, "virtio devices (--disk, --net, --rng, --vsock, "
                          "--balloon) need pyrovisor's boot protocol: a Multiboot kernel is not told where they are")
    if config.tpm is not None:
        raise ConfigError("boot protocol", config.boot_protocol, "the vTPM (--tpm) is not measured or attached for "
                          "Multiboot kernels yet")
    for module in config.modules:
        if not str(module.path) or "\0" in str(module.path) or "\0" in module.args:
            raise ConfigError("module", str(module.path), "needs a file name and no NUL characters")


def check_memory_size(size: int, shown: str) -> None:
    """Refuse a guest RAM size this VMM or this host cannot give; `shown` is how the user wrote it."""
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ConfigError("memory size", shown,
                          f"must be between {format_size(MIN_MEMORY)} and {format_size(MAX_MEMORY)}")
    if size % MEMORY_GRANULE:
        raise ConfigError("memory size", shown, f"must be a multiple of {format_size(MEMORY_GRANULE)}")
    available = host_memory_limit()
    if available is not None and size > available:
        raise ConfigError("memory size", shown, f"larger than this host's RAM and swap ({available >> 20} MiB)")


def check_vcpu_count(vcpus: int) -> None:
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError("vcpus", vcpus, f"must be between 1 and {MAX_VCPUS}, the most this VMM supports "
                                          "(one TSS per vCPU in one boot page)")


def check_dirty_ring_entries(entries: int) -> None:
    if entries and (entries < MIN_DIRTY_RING_ENTRIES or entries & (entries - 1)):
        raise ConfigError("dirty ring entries", entries,
                          f"must be 0 (bitmap) or a power of two of at least {MIN_DIRTY_RING_ENTRIES}")


MAX_VIRTIO_DEVICES = 16  # the boot-info table's size; also the GSIs reserved for them
TAP_NAME_MAX = 15  # IFNAMSIZ - 1
MAC_LENGTH = 17


def check_virtio_devices(config: MachineConfig) -> None:
    """The virtio devices a configuration asks for: how many, and values that are well-formed (whether a disk
    file or a tap exists is checked when the device is created)."""
    count = len(config.disks) + len(config.nets) + int(config.rng) + int(config.vsock is not None)
    count += int(config.balloon is not None)
    if count > MAX_VIRTIO_DEVICES:
        raise ConfigError("virtio devices", count, f"at most {MAX_VIRTIO_DEVICES}")
    for disk in config.disks:
        if not str(disk.path) or "\0" in str(disk.path):
            raise ConfigError("disk", str(disk.path), "needs a file name")
        if len(disk.serial.encode()) > 20:
            raise ConfigError("disk serial", disk.serial, "at most 20 bytes")
    taps = [net.tap for net in config.nets]
    for net in config.nets:
        if not net.tap or len(net.tap.encode()) > TAP_NAME_MAX or "/" in net.tap or any(c.isspace() for c in net.tap):
            raise ConfigError("tap", net.tap, f"an interface name of 1 to {TAP_NAME_MAX} bytes without / or spaces")
        if taps.count(net.tap) > 1:
            raise ConfigError("tap", net.tap, "given twice")
        if net.mac and not _valid_mac(net.mac):
            raise ConfigError("mac", net.mac, "expected six hex bytes like 52:54:00:12:34:56, not multicast")
    if config.vsock is not None:
        if not 3 <= config.vsock.cid < 0xFFFFFFFF:
            raise ConfigError("vsock cid", config.vsock.cid, "must be at least 3 (0-2 are reserved) and below 2^32-1")
        if not str(config.vsock.uds_path):
            raise ConfigError("vsock socket", str(config.vsock.uds_path), "needs a path")
    if config.balloon is not None:
        check_balloon(config.balloon)


MAX_BALLOON_INTERVAL_S = 86400.0


def check_balloon(balloon: BalloonConfig) -> None:
    interval = balloon.stats_interval_s
    if not math.isfinite(interval) or not (interval == 0 or 0.01 <= interval <= MAX_BALLOON_INTERVAL_S):
        raise ConfigError("balloon statistics interval", interval,
                          f"0 (only on request) or 0.01 to {MAX_BALLOON_INTERVAL_S:g} seconds")


def _valid_mac(text: str) -> bool:
    parts = text.split(":")
    if len(text) != MAC_LENGTH or len(parts) != 6:
        return False
    try:
        first = int(parts[0], 16)
        for part in parts:
            int(part, 16)
    except ValueError:
        return False
    return not first & 1


def format_size(size: int) -> str:
    """A byte count exactly, in the largest binary unit that divides it: '64 MiB', '1 TiB', '3000 bytes'."""
    for factor, unit in ((1 << 40, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def host_memory_limit() -> int | None:
    """RAM plus swap of this host in bytes (from /proc/meminfo), or None where unknown."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    if "MemTotal" not in values:
        return None
    return values["MemTotal"] + values.get("SwapTotal", 0)


def cpu_count() -> int:
    return os.cpu_count() or 1
