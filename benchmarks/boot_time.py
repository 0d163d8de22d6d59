"""Time from VM creation to the first user-mode instruction: the OS guest (64 MiB) against the hello guest.

For the OS guest, `kernel bootmark=0x80` makes the kernel write port 0x80 immediately before the IRETQ
into the first process; a device on that port timestamps it. The hello guest has no such mark: its
baseline is the first byte of the line its user-mode function prints (its first action in user mode, so
an upper bound on its time to user mode). Both clocks start before `build_vm`, so VMM set-up (memory,
ELF loading, boot page tables, vCPUs) counts; the table also shows the part spent in the guest.
Rounds alternate between the two guests; medians are reported.

Run: python benchmarks/boot_time.py [--rounds R] [--args "programs"] [--vcpus N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from pyrovisor.builder import build_vm
from pyrovisor.catalog import load_catalog
from pyrovisor.config import MachineConfig

MiB = 1 << 20
MEMORY = 64 * MiB
BOOT_MARK_PORT = 0x80
HELLO_USER_LINE = b"hello from user mode"
TARGET_MS = 50.0


@dataclass(frozen=True)
class Boot:
    build_ms: float  # build_vm returned
    user_ms: float  # first user-mode instruction (OS) or first user-mode output (hello)


class BootMark:
    """Port 0x80: the time of the guest's first write."""

    def __init__(self) -> None:
        self.at: float | None = None

    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def boot_os(args: str, vcpus: int) -> Boot:
    catalog = load_catalog()
    spec = catalog["os"]
    config = MachineConfig(kernel=spec.elf, memory_size=MEMORY, vcpus=vcpus, initrd=spec.initrd,
                           cmdline=f"{args}; kernel bootmark={BOOT_MARK_PORT:#x}")
    mark = BootMark()
    start = time.perf_counter()
    vmm = build_vm(config, lambda data: None)
    built = time.perf_counter()
    with vmm:
        vmm.port_bus.insert(BOOT_MARK_PORT, 1, mark, "boot mark")
        outcome = vmm.run(timeout=120)
    assert outcome.exit_code == 0, outcome
    assert mark.at is not None, "the kernel never wrote the boot mark"
    return Boot((built - start) * 1e3, (mark.at - start) * 1e3)


def boot_hello() -> Boot:
    spec = load_catalog()["hello"]
    config = MachineConfig(kernel=spec.elf, memory_size=MEMORY, vcpus=1)
    console = bytearray()
    arrivals: list[tuple[int, float]] = []  # (console length before the chunk, when it came)

    def output(data: bytes) -> None:
        arrivals.append((len(console), time.perf_counter()))
        console.extend(data)

    start = time.perf_counter()
    vmm = build_vm(config, output)
    built = time.perf_counter()
    with vmm:
        outcome = vmm.run(timeout=60)
    position = console.find(HELLO_USER_LINE)
    assert outcome.exit_code == 0 and position >= 0, outcome
    first_byte_at = max(at for offset, at in arrivals if offset <= position)  # the chunk holding the line's start
    return Boot((built - start) * 1e3, (first_byte_at - start) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--args", default="counter count=3 period_ms=10; memcheck mib=4 passes=1",
                        help="the OS guest's programs")
    parser.add_argument("--vcpus", type=int, default=2)
    args = parser.parse_args()
    os_boots, hello_boots = [], []
    for _ in range(args.rounds):
        os_boots.append(boot_os(args.args, args.vcpus))
        hello_boots.append(boot_hello())

    def median(values: list[float]) -> float:
        return statistics.median(values)

    table = Table(title=f"time to user mode, 64 MiB guests (medians of {args.rounds} alternating rounds)")
    for column in ("guest", "VMM build (ms)", "in the guest (ms)", "to user mode (ms)", "range (ms)",
                   f"< {TARGET_MS:.0f} ms"):
        table.add_column(column, justify="right")
    for name, boots in ((f"os ({args.vcpus} vCPUs): first user instruction", os_boots),
                        ("hello: first user-mode output", hello_boots)):
        user = sorted(b.user_ms for b in boots)
        table.add_row(name, f"{median([b.build_ms for b in boots]):.1f}",
                      f"{median([b.user_ms - b.build_ms for b in boots]):.1f}", f"{median(user):.1f}",
                      f"{user[0]:.1f}-{user[-1]:.1f}", "met" if median(user) < TARGET_MS else "missed")
    console = Console(width=200)
    console.print(table)
    ratios = sorted(o.user_ms / h.user_ms for o, h in zip(os_boots, hello_boots, strict=True))
    console.print(f"os / hello, median of per-round ratios: {statistics.median(ratios):.2f} "
                  f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
