"""The host's configuration: a TOML file (`[host]`, `[sampling]`, `[[vm]]`) or a JSON VM spec, checked before anything
starts; every problem is one ConfigError naming the field."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrovisor.arch.x86_64.layout import parse_size
from pyrovisor.config import DiskConfig, check_memory_size, check_vcpu_count
from pyrovisor.errors import ConfigError
from pyrovisor.host.policy import PolicySettings

MiB = 1 << 20
# The floor of a VM that gives none: what the OS guest needs to boot and start its programs. Measured: a 64 MiB or
# 1 GiB OS guest has 2 MiB resident after boot (one 2 MiB page holds kernel, page tables and boot data); 32 MiB
# leaves its programs room for what they take in the first policy interval, before the estimator sees them.
DEFAULT_MIN = 32 * MiB
DEFAULT_SHARES = 1000.0
DEFAULT_OVERHEAD_PER_VM = 8 * MiB  # the host's memory per VM beyond guest pages (benchmarks/overcommit.py density)
OVERHEAD_HEADROOM = 64 * MiB  # added to the host's own RSS at start when `overhead = "auto"`
VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_SHARES = 1e9


@dataclass(frozen=True)
class SamplingSettings:
    """The host-side working-set estimator of each VM (pyrovisor.wss)."""

    enabled: bool = True
    sample_pages: int = 1000
    interval_s: float = 1.0


@dataclass(frozen=True)
class VmSpec:
    """One VM the host runs: a guest, its size, its shares and floor, and where its console goes."""

    vm_id: str
    guest: str
    kernel: Path
    memory_size: int
    vcpus: int = 1
    args: str = ""
    initrd: Path | None = None
    shares: float = DEFAULT_SHARES
    minimum: int = DEFAULT_MIN
    disks: tuple[DiskConfig, ...] = ()
    huge_pages: bool = True
    stats_interval_s: float = 1.0  # how often the balloon asks the guest for statistics
    log: Path | None = None  # the console log; default: LOG_DIR/ID.log


@dataclass(frozen=True)
class HostSettings:
    budget: int
    log_dir: Path = Path("host-logs")
    overhead: int | None = None  # the host's own memory beside guests; None: measured at start (RSS + headroom)
    overhead_per_vm: int = DEFAULT_OVERHEAD_PER_VM
    default_min: int = DEFAULT_MIN
    policy: PolicySettings = field(default_factory=PolicySettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


@dataclass(frozen=True)
class HostConfig:
    settings: HostSettings
    vms: tuple[VmSpec, ...] = ()


# --- values -------------------------------------------------------------------------------------------------------
def size_value(value: object, name: str) -> int:
    """A size: a string such as "64M" or "1G", or a whole number of MiB."""
    if isinstance(value, bool):
        raise ConfigError(name, value, "expected a size such as \"64M\" or a number of MiB")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(name, value, "must not be negative")
        return value * MiB
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ConfigError:
            raise ConfigError(name, value, "expected a size such as \"64M\" or \"1G\" (or a number of MiB)") from None
    raise ConfigError(name, value, "expected a size such as \"64M\" or a number of MiB")


def number_value(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(name, value, "expected a number")
    if not low <= value <= high:
        raise ConfigError(name, value, f"must be between {low:g} and {high:g}")
    return float(value)


def int_value(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "expected a whole number")
    return value


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, value, "expected a string")
    return value


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "expected true or false")
    return value


def _only(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(where, ", ".join(unknown), f"unknown key(s); known: {', '.join(sorted(allowed))}")


# --- a VM spec (a [[vm]] table or the API's JSON) --------------------------------------------------------------------
VM_KEYS = {"id", "guest", "initrd", "memory", "vcpus", "args", "shares", "min", "disks", "huge_pages",
           "stats_interval_s", "log"}


def parse_vm_spec(table: Mapping[str, Any], default_id: str, default_min: int, log_dir: Path,
                  where: str = "vm") -> VmSpec:
    """A VM from a mapping (TOML table or JSON object); the guest is resolved (a built-in name or an ELF file)."""
    from pyrovisor.catalog import check_vcpu_limit, resolve_guest

    if not isinstance(table, Mapping):
        raise ConfigError(where, table, "expected a table (a JSON object)")
    _only(table, VM_KEYS, where)
    vm_id = _str(table.get("id", default_id), f"{where} id")
    if not VM_ID.fullmatch(vm_id):
        raise ConfigError(f"{where} id", vm_id, "1 to 63 letters, digits, '.', '_' or '-', starting with a letter or "
                                                "digit")
    where = f"vm {vm_id!r}"
    if "guest" not in table:
        raise ConfigError(f"{where} guest", None, "missing: a built-in guest name (e.g. \"os\") or an ELF file")
    guest = _str(table["guest"], f"{where} guest")
    elf, spec = resolve_guest(guest)
    if spec is None and not elf.is_file():
        raise ConfigError(f"{where} guest", guest, "no such file, and not a built-in guest")
    memory = size_value(table["memory"], f"{where} memory") if "memory" in table else (
        spec.memory_size if spec else 64 * MiB)
    check_memory_size(memory, str(table.get("memory", memory)))
    vcpus = int_value(table.get("vcpus", spec.vcpus if spec else 1), f"{where} vcpus")
    check_vcpu_count(vcpus)
    check_vcpu_limit(elf, vcpus)
    args = _str(table.get("args", spec.args if spec else ""), f"{where} args")
    shares = number_value(table.get("shares", DEFAULT_SHARES), f"{where} shares", 1.0, MAX_SHARES)
    minimum = size_value(table["min"], f"{where} min") if "min" in table else min(default_min, memory)
    if minimum > memory:
        raise ConfigError(f"{where} min", table.get("min"), f"larger than the VM's memory ({memory >> 20} MiB)")
    disks = tuple(_disk(item, f"{where} disks") for item in _list(table.get("disks", []), f"{where} disks"))
    huge_pages = _bool(table.get("huge_pages", True), f"{where} huge_pages")
    stats = number_value(table.get("stats_interval_s", 1.0), f"{where} stats_interval_s", 0.0, 86400.0)
    if 0 < stats < 0.01:
        raise ConfigError(f"{where} stats_interval_s", stats, "0 (only on request) or at least 0.01 seconds")
    log = Path(_str(table["log"], f"{where} log")) if "log" in table else log_dir / f"{vm_id}.log"
    initrd = Path(_str(table["initrd"], f"{where} initrd")) if "initrd" in table else (spec.initrd if spec else None)
    if initrd is not None and not initrd.is_file():
        raise ConfigError(f"{where} initrd", str(initrd), "no such file")
    return VmSpec(vm_id=vm_id, guest=guest, kernel=elf, memory_size=memory, vcpus=vcpus, args=args,
                  initrd=initrd, shares=shares, minimum=minimum, disks=disks,
                  huge_pages=huge_pages, stats_interval_s=stats, log=log)


def _list(value: object, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(name, value, "expected a list")
    return value


def _disk(item: object, name: str) -> DiskConfig:
    """"FILE[,ro][,serial=S]" as `--disk` takes it, or {path, read_only, serial}."""
    if isinstance(item, str):
        from pyrovisor.api.device_options import disk

        try:
            result: DiskConfig = disk(item)
        except Exception as exc:  # argparse.ArgumentTypeError: the message says what is wrong
            raise ConfigError(name, item, str(exc)) from None
        return result
    if isinstance(item, Mapping):
        _only(item, {"path", "read_only", "serial"}, name)
        return DiskConfig(path=Path(_str(item.get("path", ""), f"{name} path")),
                          read_only=_bool(item.get("read_only", False), f"{name} read_only"),
                          serial=_str(item.get("serial", ""), f"{name} serial"))
    raise ConfigError(name, item, "expected \"FILE[,ro][,serial=S]\" or {path = ..., read_only = ...}")


# --- the whole file -----------------------------------------------------------------------------------------------
HOST_KEYS = {"budget", "log_dir", "overhead", "overhead_per_vm", "default_min", "policy", "tax", "margin",
             "margin_fraction", "min_move", "interval_s", "balloon_timeout_s", "guest_stats_field",
             "guest_stats_max_age_s", "reclaim_backoff_s"}
SAMPLING_KEYS = {"enabled", "sample_pages", "interval_s"}


def parse_host_settings(table: Mapping[str, Any], sampling: Mapping[str, Any], base: Path) -> HostSettings:
    _only(table, HOST_KEYS, "[host]")
    _only(sampling, SAMPLING_KEYS, "[sampling]")
    if "budget" not in table:
        raise ConfigError("[host] budget", None, "missing: the memory all VMs and the host may use, e.g. \"3G\"")
    budget = size_value(table["budget"], "[host] budget")
    if budget < 64 * MiB:
        raise ConfigError("[host] budget", table["budget"], "at least 64M")
    overhead_value = table.get("overhead", "auto")
    overhead = None if overhead_value == "auto" else size_value(overhead_value, "[host] overhead")
    policy = PolicySettings(
        kind=_str(table.get("policy", "share"), "[host] policy"),
        tax=number_value(table.get("tax", 0.75), "[host] tax", 0.0, 0.999),
        margin_bytes=size_value(table.get("margin", "16M"), "[host] margin"),
        margin_fraction=number_value(table.get("margin_fraction", 0.10), "[host] margin_fraction", 0.0, 10.0),
        min_move_bytes=size_value(table.get("min_move", "8M"), "[host] min_move"),
        interval_s=number_value(table.get("interval_s", 1.0), "[host] interval_s", 0.05, 86400.0),
        balloon_timeout_s=number_value(table.get("balloon_timeout_s", 10.0), "[host] balloon_timeout_s", 0.05,
                                       86400.0),
        guest_stats_field=_str(table.get("guest_stats_field", "free"), "[host] guest_stats_field"),
        guest_stats_max_age_s=number_value(table.get("guest_stats_max_age_s", 10.0), "[host] guest_stats_max_age_s",
                                           0.05, 86400.0),
        reclaim_backoff_s=number_value(table.get("reclaim_backoff_s", 30.0), "[host] reclaim_backoff_s", 0.05,
                                       86400.0),
    )
    policy.validate()
    settings = SamplingSettings(
        enabled=_bool(sampling.get("enabled", True), "[sampling] enabled"),
        sample_pages=int_value(sampling.get("sample_pages", 1000), "[sampling] sample_pages"),
        interval_s=number_value(sampling.get("interval_s", 1.0), "[sampling] interval_s", 0.05, 3600.0),
    )
    if not 16 <= settings.sample_pages <= 65536:
        raise ConfigError("[sampling] sample_pages", settings.sample_pages, "between 16 and 65536")
    log_dir = Path(_str(table.get("log_dir", "host-logs"), "[host] log_dir"))
    return HostSettings(budget=budget, log_dir=log_dir if log_dir.is_absolute() else base / log_dir,
                        overhead=overhead,
                        overhead_per_vm=size_value(table.get("overhead_per_vm", DEFAULT_OVERHEAD_PER_VM // MiB),
                                                   "[host] overhead_per_vm"),
                        default_min=size_value(table.get("default_min", DEFAULT_MIN // MiB), "[host] default_min"),
                        policy=policy, sampling=settings)


def parse_host_config(data: Mapping[str, Any], base: Path) -> HostConfig:
    _only(data, {"host", "sampling", "vm"}, "host configuration")
    host = data.get("host")
    if not isinstance(host, Mapping):
        raise ConfigError("[host]", host, "missing: the file needs a [host] table with a budget")
    sampling = data.get("sampling", {})
    if not isinstance(sampling, Mapping):
        raise ConfigError("[sampling]", sampling, "expected a table")
    settings = parse_host_settings(host, sampling, base)
    tables = _list(data.get("vm", []), "[[vm]]")
    vms = []
    for index, table in enumerate(tables, 1):
        vms.append(parse_vm_spec(table, f"vm{index}", settings.default_min, settings.log_dir, f"[[vm]] {index}"))
    ids = [vm.vm_id for vm in vms]
    for vm_id in ids:
        if ids.count(vm_id) > 1:
            raise ConfigError("[[vm]] id", vm_id, "given to more than one VM")
    return HostConfig(settings, tuple(vms))


def load_host_config(path: Path) -> HostConfig:
    """Read and check a host.toml; relative paths in it are relative to its folder."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("--config", str(path), exc.strerror or "cannot be read") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from None
    return parse_host_config(data, path.parent)
