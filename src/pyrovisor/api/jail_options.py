"""The --jail options shared by `run`, `restore` and `receive`, and the step that enters the jail."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pyrovisor.api.cli import memory_size, positive_number
from pyrovisor.errors import ConfigError, JailError

if TYPE_CHECKING:
    from pyrovisor.config import MachineConfig
    from pyrovisor.confine.jail import Bind

NOBODY = 65534
JAIL_OVERHEAD = 256 << 20  # the VMM's own memory (interpreter, modules, buffers) on top of guest RAM
UNKNOWN_RAM_LIMIT = 2 << 30  # --jail-memory when the guest's RAM is not known before it arrives
COMPANIONS = ("jail_uid", "jail_gid", "jail_memory", "jail_cpus")


def jail_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a numeric user or group id") from None
    if not 0 <= value < 2**32 - 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be 0 to 4294967294")
    return value


def add_jail_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("jail", "confine the VMM (as root; docs/isolation.md)")
    group.add_argument("--jail", type=Path, metavar="DIR",
                       help="run the VMM in new mount, PID, network, IPC and UTS namespaces, pivoted into DIR (which "
                            "holds only /dev/kvm, Python, pyrovisor and the VM's files, each read-only, and DIR "
                            "itself, writable, at its own path: put the --api socket and snapshots there), as an "
                            "unprivileged user with no capabilities and no_new_privs, in a cgroup")
    group.add_argument("--jail-uid", type=jail_id, metavar="UID", help=f"the jailed VMM's user (default {NOBODY})")
    group.add_argument("--jail-gid", type=jail_id, metavar="GID", help=f"the jailed VMM's group (default {NOBODY})")
    group.add_argument("--jail-memory", type=memory_size, metavar="SIZE",
                       help="the cgroup's memory limit, guest RAM included (default: guest RAM + 256M; 2G when the "
                            "RAM is not known in advance, for restore and receive)")
    group.add_argument("--jail-cpus", type=positive_number, metavar="N",
                       help="the cgroup's CPU limit, in CPUs (default: one per vCPU plus one; the host's CPUs for "
                            "restore and receive)")


def machine_binds(config: MachineConfig) -> list[Bind]:
    """The files a new VM opens, mounted into the jail; refuses devices that cannot follow the VMM into it."""
    from pyrovisor.confine.jail import Bind

    if config.tpm is not None:
        raise JailError("use --tpm", "the vTPM runs swtpm, a separate program with its own libraries and state that "
                        "is not in the jail; run without --jail, or without --tpm")
    if config.nets:
        raise JailError("use --net", f"the tap device {config.nets[0].tap} lives in the host's network namespace, "
                        "which the jailed VMM leaves; run without --jail, or without --net")
    binds = [Bind(config.kernel)]
    binds += [Bind(path) for path in (config.initrd,) if path is not None]
    binds += [Bind(module.path) for module in config.modules]
    binds += [Bind(disk.path, writable=not disk.read_only) for disk in config.disks]
    return binds


def jail_owner(args: argparse.Namespace) -> tuple[int, int]:
    """The uid and gid the jailed VMM runs as."""
    return (NOBODY if args.jail_uid is None else args.jail_uid, NOBODY if args.jail_gid is None else args.jail_gid)


def enter_jail(args: argparse.Namespace, binds: Sequence[Bind] = (), machine: MachineConfig | None = None,
               created: Sequence[tuple[str, Path]] = (), memory: int | None = None) -> int | None:
    """With --jail: confine the rest of this command and return None in the jailed process, or the jailed
    process's exit code in the launcher. Without it: None (and the companions must not be given).

    `binds` are files the VMM opens; `machine`, a new VM's configuration (its files, RAM, vCPUs, sockets);
    `created`, (flag, path) of files and sockets the VMM creates: in the jail, only inside DIR; `memory`, the
    guest's RAM when known without `machine`."""
    from pyrovisor.api.terminal import host_message
    from pyrovisor.confine.cgroup import CgroupLimits
    from pyrovisor.confine.jail import JailConfig, enter, inside

    if args.jail is None:
        given = [name for name in COMPANIONS if getattr(args, name, None) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise JailError(f"use {flag}", "it only applies with --jail DIR")
        return None
    directory = args.jail.absolute()
    vcpus = None
    if machine is not None:
        binds = [*binds, *machine_binds(machine)]
        memory, vcpus = machine.memory_size, machine.vcpus
        if machine.vsock is not None:
            created = [*created, ("--vsock", machine.vsock.uds_path)]
    api = getattr(args, "api", None)
    for flag, path in ([("--api", api)] if api is not None else []) + list(created):
        if not inside(path.absolute().parent, directory):
            raise ConfigError(flag, str(path), f"with --jail the VMM can only create files and sockets inside "
                              f"{directory}, where the host reaches them")
    limit = args.jail_memory if args.jail_memory is not None else (
        memory + JAIL_OVERHEAD if memory is not None else UNKNOWN_RAM_LIMIT)
    cpus = args.jail_cpus if args.jail_cpus is not None else float(vcpus + 1 if vcpus else os.cpu_count() or 1)
    uid, gid = jail_owner(args)
    config = JailConfig(directory=directory, uid=uid, gid=gid, limits=CgroupLimits(memory_bytes=limit, cpus=cpus),
                        binds=tuple(binds))
    return enter(config, announce=host_message)
