"""UDP echo through virtio-net on a tap: echoed packets/s and MB/s, pyrovisor against QEMU microvm, same guest."""

# The OS guest's `net` program (guests/programs/net.c) answers UDP datagrams on port 7 with the same payload. For
# each VMM, wait mode and datagram size, the script makes a network namespace holding a tap (10.231.53.1/24, a
# permanent neighbour entry for the guest, so no ARP), boots the guest in the namespace with `ip netns exec`
# (128 MiB, 1 vCPU, `net ... count=N`), and a client in the namespace sends N datagrams with up to W in flight.
# An echo is checked byte for byte; a window with nothing back for 0.2 s is counted as lost and refilled.
# Figures: echoed datagrams per second and echoed payload MB/s (10^6 bytes, one direction) from the first send
# to the last echo, and the guest's own count from its summary line.
#   pyrovisor: `pyrovisor run os --vcpus 1 --net tap=NAME,mac=M` (its virtio-net on the I/O thread in Python).
#   QEMU:      `-M microvm,acpi=off -netdev tap,...,vhost=off -device virtio-net-device` (its user-space backend).
# Needs root (namespaces, taps) and /dev/kvm; QEMU is optional (`apt-get install qemu-system-x86`).
#
# Run: python benchmarks/udp_echo.py [--datagrams N] [--window W] [--sizes 64,1400] [--waits poll,irq]
#                                    [--vmms pyrovisor,qemu] [--rounds R]

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.catalog import guests_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from io_exits import load_average  # a sibling script, not a package

QEMU = "qemu-system-x86_64"
SUBNET = "10.231.53"
GUEST, HOST = f"{SUBNET}.2", f"{SUBNET}.1"
GUEST_MAC = "52:54:00:12:34:56"
TAP = "pvbench0"
PORT = 7

CLIENT = r"""
import json, os, socket, struct, sys, time
guest, port, count, window, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((guest, port))
sock.settimeout(0.2)
body = os.urandom(size)
sent = echoed = lost = bad = 0
in_flight = 0
started = time.perf_counter()
last = started
while echoed + lost < count:
    while in_flight < window and sent < count:
        sock.send(body)
        sent += 1
        in_flight += 1
    try:
        data = sock.recv(65536)
    except TimeoutError:
        lost += in_flight  # nothing came back for 0.2 s: give up what is in flight
        in_flight = 0
        continue
    if data != body:
        bad += 1
    echoed += 1
    in_flight = max(0, in_flight - 1)
    last = time.perf_counter()
print(json.dumps({"sent": sent, "echoed": echoed, "lost": lost, "bad": bad, "seconds": last - started}))
"""


@dataclass
class Result:
    vmm: str
    wait: str
    size: int
    sent: int
    echoed: int
    lost: int
    bad: int
    seconds: float
    guest: str  # the guest's summary line

    @property
    def rate(self) -> float:
        return self.echoed / self.seconds if self.seconds > 0 else 0.0

    @property
    def megabytes(self) -> float:
        return self.rate * self.size / 1e6


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def host_description() -> list[str]:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    lines = [f"CPU: {model}, {os.cpu_count()} CPUs; kernel {platform.release()}; Python {platform.python_version()}"]
    if shutil.which(QEMU):
        version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()
        lines.append(f"QEMU: {version[0] if version else '?'}")
    return lines




def vmm_command(vmm: str, wait: str, count: int) -> list[str]:
    program = f"net ip={GUEST}/24 port={PORT} count={count} seconds=120 wait={wait}"
    if vmm == "pyrovisor":
        return [sys.executable, "-m", "pyrovisor", "run", "os", "--memory", "128M", "--vcpus", "1", "--timeout", "150",
                "--net", f"tap={TAP},mac={GUEST_MAC}", "--args", program]
    directory = guests_dir()
    return [QEMU, "-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false", "-accel", "kvm",
            "-m", "128M", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
            "-kernel", str(directory / "os.elf"), "-initrd", str(directory / "os-programs.img"), "-append", program,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}"]


def run_one(vmm: str, wait: str, size: int, count: int, window: int) -> Result:
    namespace = f"pyrovisor-bench-{os.getpid()}"
    sh("ip", "netns", "add", namespace)
    try:
        for command in (["link", "set", "lo", "up"], ["tuntap", "add", TAP, "mode", "tap"],
                        ["addr", "add", f"{HOST}/24", "dev", TAP], ["link", "set", TAP, "up"],
                        ["neigh", "add", GUEST, "lladdr", GUEST_MAC, "dev", TAP, "nud", "permanent"]):
            sh("ip", "-n", namespace, *command)
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *vmm_command(vmm, wait, count)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   text=True)
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if line.startswith("net 1: ready"):
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if not ready.wait(60):
                raise RuntimeError(f"{vmm}: the guest never got ready:\n{''.join(lines)[-2000:]}")
            client = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", CLIENT, GUEST, str(PORT),
                                     str(count), str(window), str(size)], capture_output=True, text=True, timeout=600)
            if client.returncode:
                raise RuntimeError(f"client failed: {client.stderr}")
            figures = json.loads(client.stdout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)  # the guest exits by itself once it answered `count` datagrams
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            reader.join(5)
        summary = next((line.strip() for line in lines if re.match(r"net 1: handled", line)), "(no summary)")
        return Result(vmm, wait, size, figures["sent"], figures["echoed"], figures["lost"], figures["bad"],
                      figures["seconds"], summary)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datagrams", type=int, default=200000, help="datagrams sent per measurement")
    parser.add_argument("--window", type=int, default=16, help="datagrams in flight at most")
    parser.add_argument("--sizes", default="64,1400", help="UDP payload sizes in bytes (at most 1472)")
    parser.add_argument("--waits", default="poll,irq", help="the guest driver's wait modes")
    parser.add_argument("--vmms", default="pyrovisor,qemu", help="pyrovisor and/or qemu")
    parser.add_argument("--rounds", type=int, default=1, help="measurements of each configuration")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("needs root and iproute2's ip (network namespaces and tap devices)", file=sys.stderr)
        return 1
    if not (Path(guests_dir()) / "os.elf").exists():
        print("the OS guest is not built (make -C guests)", file=sys.stderr)
        return 1
    vmms = [name for name in args.vmms.split(",") if name]
    if "qemu" in vmms and shutil.which(QEMU) is None:
        print(f"{QEMU} is not installed: measuring pyrovisor only", file=sys.stderr)
        vmms.remove("qemu")
    sizes = [int(size) for size in args.sizes.split(",")]
    if any(not 1 <= size <= 1472 for size in sizes):
        print("sizes must be 1 to 1472 bytes (one Ethernet frame)", file=sys.stderr)
        return 1
    print("\n".join(host_description()))
    print(f"load average at start: {load_average()}")
    print(f"{args.datagrams} datagrams per measurement, at most {args.window} in flight; "
          "MB/s = echoed payload bytes per second / 10^6")
    results = []
    for round_number in range(args.rounds):
        for wait in args.waits.split(","):
            for size in sizes:
                for vmm in vmms:
                    result = run_one(vmm, wait, size, args.datagrams, args.window)
                    results.append(result)
                    print(f"round {round_number + 1}: {vmm:9} wait={wait:4} size={size:5}: {result.rate:9.0f} "
                          f"datagrams/s {result.megabytes:7.2f} MB/s, {result.echoed}/{result.sent} echoed, "
                          f"{result.lost} lost, {result.bad} corrupt, load {load_average()}", flush=True)
                    print(f"    guest: {result.guest}", flush=True)
    print(f"load average at end: {load_average()}")
    return 0 if all(result.bad == 0 for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
