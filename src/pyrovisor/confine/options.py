"""The --seccomp option of the commands that run VMs (run, restore, receive, sandbox, host), defined once."""

from __future__ import annotations

import argparse

SECCOMP_MODES = ("enforce", "audit", "off")


def add_seccomp_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seccomp", choices=SECCOMP_MODES, default=None,
                        help="confine each kind of VMM thread (vCPU, I/O, API, migration, the main thread) to the system calls it needs "
                             "once set-up is done: enforce refuses any other call, logs it and stops the VM; audit only "
                             "logs it; off (default: enforce, or $PYROVISOR_SECCOMP)")


def configure_seccomp(args: argparse.Namespace) -> None:
    """Apply --seccomp (or the environment's mode, else enforce) to this process; call it where the VMM runs,
    before the VM is built, so the supervisor starts while the VM is set up."""
    from pyrovisor.confine.policy import configure, mode_from_environment

    configure(args.seccomp if args.seccomp is not None else mode_from_environment(default="enforce"))
