"""The built-in guests: their manifest (guests/manifest.toml) and the ELF files built from it."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pyrovisor.arch.x86_64.layout import parse_size
from pyrovisor.errors import ConfigError, LoaderError

MANIFEST_NAME = "manifest.toml"
PROFILE_SUFFIX = ".profile.json"  # a kernel's introspection profile, next to its ELF (docs/guest-os.md)
PROFILE_VCPU_LIMIT = "MAX_CPUS"  # the profile constant that bounds the vCPUs the kernel brings up


@dataclass(frozen=True)
class GuestSpec:
    name: str
    elf: Path
    description: str
    memory_size: int
    vcpus: int
    args: str
    exit_code: int
    expect: tuple[str, ...]
    timeout: float
    groups: tuple[str, ...]
    initrd: Path | None = None  # file placed after the kernel (e.g. an archive of programs)
    stdin: bytes = b""  # keyboard input the tests feed to the console


def guests_dir() -> Path:
    """Where the built guests are installed (package data: pyrovisor/_guests)."""
    return Path(str(resources.files("pyrovisor"))) / "_guests"


def load_catalog(directory: Path | None = None) -> dict[str, GuestSpec]:
    directory = directory or guests_dir()
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        raise LoaderError(str(manifest), "the built-in guests are not built; reinstall with "
                          "`pip install -e .` or run `make -C guests OUT=src/pyrovisor/_guests`")
    try:
        data = tomllib.loads(manifest.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise LoaderError(str(manifest), f"malformed manifest: {exc}") from None
    return {name: _spec(name, entry, directory) for name, entry in data.get("guests", {}).items()}


def _spec(name: str, entry: dict[str, object], directory: Path) -> GuestSpec:
    try:
        return GuestSpec(
            name=name,
            elf=directory / str(entry["elf"]),
            description=str(entry.get("description", "")),
            memory_size=parse_size(str(entry.get("memory", "64M"))),
            vcpus=int(str(entry.get("vcpus", 1))),
            args=str(entry.get("args", "")),
            exit_code=int(str(entry.get("exit_code", 0))),
            expect=tuple(str(line) for line in _list(entry.get("expect", []))),
            timeout=float(str(entry.get("timeout", 60))),
            groups=tuple(str(group) for group in _list(entry.get("groups", []))),
            initrd=directory / str(entry["initrd"]) if "initrd" in entry else None,
            stdin=str(entry.get("stdin", "")).encode(),
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"manifest entry [guests.{name}]", entry, f"bad or missing field: {exc}") from None


def _list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {value!r}")
    return value


def resolve_guest(name_or_path: str) -> tuple[Path, GuestSpec | None]:
    """A built-in guest by name, or an ELF file by path."""
    candidate = Path(name_or_path)
    if "/" in name_or_path or candidate.suffix == ".elf" or candidate.is_file():
        return candidate, None
    catalog = load_catalog()
    if name_or_path not in catalog:
        raise ConfigError("guest", name_or_path, f"not a file and not a built-in guest ({', '.join(catalog)})")
    spec = catalog[name_or_path]
    return spec.elf, spec


def vcpu_limit(elf: Path) -> int | None:
    """The most vCPUs the kernel in `elf` brings up, when its profile says (`MAX_CPUS` in the OS guest);
    None when it does not say. The VMM's own limit (32) applies either way."""
    profile = elf.with_name(elf.stem + PROFILE_SUFFIX)
    try:
        constants = json.loads(profile.read_text()).get("constants", {})
    except (OSError, ValueError, AttributeError):
        return None
    limit = constants.get(PROFILE_VCPU_LIMIT) if isinstance(constants, dict) else None
    return limit if isinstance(limit, int) and limit > 0 else None


def check_vcpu_limit(elf: Path, vcpus: int) -> None:
    """Refuse more vCPUs than the guest kernel brings up (it would leave the others halted for good)."""
    limit = vcpu_limit(elf)
    if limit is not None and vcpus > limit:
        raise ConfigError("vcpus", vcpus, f"{elf.name} brings up at most {limit} vCPUs "
                          f"({PROFILE_VCPU_LIMIT} in {elf.stem}{PROFILE_SUFFIX}); the others would stay halted")
