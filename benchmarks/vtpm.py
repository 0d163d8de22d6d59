"""What the vTPM costs: boot time with and without measuring, each firmware step, a quote asked by the host, one
asked by the guest through the CRB (pyrovisor's Python device against QEMU's tpm-crb on the same swtpm), and a
verification.

Every figure is the median of --repeats runs; the CPU model and the load are printed beside them.

Run: python benchmarks/vtpm.py [--repeats 10] [--no-qemu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pyrovisor.builder import build_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig, TpmConfig
from pyrovisor.devices.tpm import TPM_NAME, VirtualTpm
from pyrovisor.tpm.attestation import golden_values, verify
from pyrovisor.tpm.commands import TpmCommands
from pyrovisor.tpm.event_log import EventLog, measure_boot
from pyrovisor.tpm.swtpm import Swtpm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from io_exits import cpu_model, load_average  # noqa: E402  (a sibling script, not a package)

KERNEL = guests_dir() / "os.elf"
INITRD = guests_dir() / "os-programs.img"
CMDLINE = "counter count=0 period_ms=50"
NONCE = bytes(range(20))
GUEST_QUOTES = 20
GUEST_QUOTE_LINE = re.compile(r"^tpm: (?P<count>\d+) quotes in (?P<us>\d+) us", re.MULTILINE)


def timed(action: Callable[[], Any]) -> float:
    """Milliseconds one call of `action` takes."""
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1e3


def median_ms(repeats: int, action: Callable[[], Any]) -> float:
    return statistics.median(timed(action) for _ in range(repeats))


def config(tpm: TpmConfig | None, cmdline: str = CMDLINE) -> MachineConfig:
    return MachineConfig(kernel=KERNEL, initrd=INITRD, memory_size=64 << 20, cmdline=cmdline, tpm=tpm)


def boot_costs(repeats: int) -> dict[str, float]:
    """build_vm (everything up to the first guest instruction) without a TPM, with a new TPM (its key is made),
    and with a TPM whose key already exists in its state directory; then each firmware step on its own."""
    def build(tpm: TpmConfig | None) -> None:
        build_vm(config(tpm), lambda data: None).close()

    figures = {"build without TPM": median_ms(repeats, lambda: build(None)),
               "build with a new TPM": median_ms(repeats, lambda: build(TpmConfig()))}
    with tempfile.TemporaryDirectory() as directory:
        build(TpmConfig(Path(directory)))  # the key is made once
        figures["build with a TPM that has its key"] = median_ms(repeats, lambda: build(TpmConfig(Path(directory))))

    steps: dict[str, list[float]] = {"swtpm start": [], "TPM2_Startup": [], "measure kernel, initrd, cmdline": [],
                                     "create the attestation key": [], "swtpm stop": []}
    kernel, initrd = KERNEL.read_bytes(), INITRD.read_bytes()
    for _ in range(repeats):
        started = time.perf_counter()
        swtpm = Swtpm.start()
        steps["swtpm start"].append((time.perf_counter() - started) * 1e3)
        commands = TpmCommands(swtpm.transmit)
        steps["TPM2_Startup"].append(timed(commands.startup))
        extend = commands.extend
        steps["measure kernel, initrd, cmdline"].append(timed(lambda: measure_boot(
            EventLog(), extend, kernel, KERNEL.name, initrd, INITRD.name, CMDLINE.encode())))  # noqa: B023
        steps["create the attestation key"].append(timed(commands.attestation_key))
        commands.close()
        steps["swtpm stop"].append(timed(swtpm.close))
    figures.update({name: statistics.median(values) for name, values in steps.items()})
    return figures


def host_quote_costs(repeats: int) -> dict[str, float]:
    """A quote asked by the VMM (what POST /tpm/quote does: quote and PCR read) and its verification."""
    with build_vm(config(TpmConfig()), lambda data: None) as vmm:
        tpm = vmm.devices[TPM_NAME]
        assert isinstance(tpm, VirtualTpm)
        answer = tpm.quote(NONCE, (8, 9))
        quote_ms = median_ms(repeats, lambda: tpm.quote(NONCE, (8, 9)))
        snapshot_ms = median_ms(repeats, tpm.save)
    import base64
    golden = golden_values(KERNEL, INITRD, CMDLINE)
    log = base64.b64decode(answer["log"])
    verify_ms = median_ms(repeats, lambda: verify(answer["quote"], log, answer["ak"].encode(), golden, NONCE))
    assert verify(answer["quote"], log, answer["ak"].encode(), golden, NONCE).ok
    return {"host quote (POST /tpm/quote)": quote_ms, "verify a quote": verify_ms,
            "save the TPM's state (snapshot)": snapshot_ms}


def guest_program() -> str:
    return f"tpm op=quote nonce={NONCE.hex()} pcrs=8,9 repeat={GUEST_QUOTES}"


def guest_quote_pyrovisor() -> float | None:
    """Microseconds per quote the guest's own driver measures, under pyrovisor."""
    console = bytearray()
    with build_vm(config(TpmConfig(), guest_program()), console.extend) as vmm:
        vmm.run(timeout=300)
    return per_quote_us(console.decode(errors="replace"))


def guest_quote_qemu() -> float | None:
    """The same guest program under QEMU's microvm with its tpm-crb on a swtpm that holds the same kind of key."""
    if shutil.which("qemu-system-x86_64") is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        state = Path(directory)
        with Swtpm.start(state) as swtpm:  # the key the guest quotes with, made as pyrovisor's firmware makes it
            commands = TpmCommands(swtpm.transmit)
            commands.startup()
            commands.attestation_key()
            commands.close()
        control = state / "qemu-ctrl.sock"
        swtpm_process = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl",
                                          f"type=unixio,path={control}", "--terminate", "--flags", "startup-clear"])
        try:
            deadline = time.monotonic() + 10
            while not control.exists():
                assert time.monotonic() < deadline, "swtpm did not start"
                time.sleep(0.01)
            result = subprocess.run(
                ["qemu-system-x86_64", "-M", "microvm,accel=kvm", "-nographic", "-nodefaults", "-serial", "stdio",
                 "-m", "64", "-chardev", f"socket,id=tpm,path={control}", "-tpmdev", "emulator,id=tpm0,chardev=tpm",
                 "-device", "tpm-crb,tpmdev=tpm0", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(KERNEL), "-initrd",
                 str(INITRD), "-append", guest_program()], capture_output=True, text=True, timeout=60)
        finally:
            swtpm_process.kill()
            swtpm_process.wait()
    return per_quote_us(result.stdout)


def per_quote_us(console: str) -> float | None:
    match = GUEST_QUOTE_LINE.search(console)
    return int(match["us"]) / int(match["count"]) if match else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU baseline")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    console = Console()
    console.print(f"CPU: {cpu_model()}; load average at the start: {load_average()}")
    figures: dict[str, Any] = {"cpu": cpu_model(), "load_start": load_average()}
    figures["boot_ms"] = boot_costs(args.repeats)
    figures["host_ms"] = host_quote_costs(args.repeats)
    figures["guest_quote_us"] = {"pyrovisor": guest_quote_pyrovisor(),
                                 "qemu": None if args.no_qemu else guest_quote_qemu()}
    figures["load_end"] = load_average()

    table = Table(title=f"vTPM costs (medians of {args.repeats})")
    table.add_column("what")
    table.add_column("ms", justify="right")
    for group in ("boot_ms", "host_ms"):
        for name, value in figures[group].items():
            table.add_row(name, f"{value:.2f}")
    console.print(table)
    overhead = figures["boot_ms"]["build with a new TPM"] - figures["boot_ms"]["build without TPM"]
    console.print(f"boot-time overhead of the vTPM: {overhead:.1f} ms with a new key, "
                  f"{figures['boot_ms']['build with a TPM that has its key'] - figures['boot_ms']['build without TPM']:.1f}"
                  " ms when the key exists")
    ours, theirs = figures["guest_quote_us"]["pyrovisor"], figures["guest_quote_us"]["qemu"]
    shown = [f"pyrovisor {ours:.0f} µs" if ours is not None else "pyrovisor: no figure (see the guest's output)"]
    if theirs is not None:
        shown.append(f"QEMU tpm-crb {theirs:.0f} µs")
        if ours is not None:
            shown.append(f"ratio QEMU/pyrovisor {theirs / ours:.2f}")
    console.print(f"a quote asked by the guest through the CRB ({GUEST_QUOTES} in a row, mean): " + ", ".join(shown))
    console.print(f"load average at the end: {figures['load_end']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
