"""The OS guest's user-mode virtio drivers against QEMU's virtio-mmio devices (`-M microvm` with KVM): device
discovery from the command line, virtio-rng, virtio-blk (the host reads back the pattern the guest wrote),
read-only and multiple disks, polling and interrupt-driven completion, virtio-net answering ARP, ping and
UDP from a network namespace, virtio-vsock against the test's own vhost-user backend (vhost_user_vsock.py),
and the kernel's exclusive device ownership."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from vhost_user_vsock import SERVICE_PORT, VsockBackend

import watched_process
from pyrovisor.catalog import guests_dir

QEMU = "qemu-system-x86_64"

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed (apt-get install qemu-system-x86)"),
]

# QEMU microvm without ACPI: 8 virtio-mmio transports of 512 bytes from 0xfeb00000 on GSI 5-12, the first
# -device on the last one; QEMU appends "virtio_mmio.device=512@<base>:<irq>" for each to the command line.
# Its transports are legacy (version 1) unless force-legacy is turned off.
MICROVM = ["-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false"]
# With ACPI (microvm's default) there are 24 transports on a second IOAPIC (GSI 24-47) and no command-line
# words: the guest must be told, as pyrovisor does.
MICROVM_ACPI = ["-M", "microvm", "-global", "virtio-mmio.force-legacy=false"]
SLOTS = [(0xFEB00E00, 12), (0xFEB00C00, 11), (0xFEB00A00, 10), (0xFEB00800, 9)]
MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def run_qemu(append: str, devices: Sequence[str], machine: Sequence[str] = MICROVM, timeout: float = 120,
             prefix: Sequence[str] = ()) -> tuple[int, str]:
    """(exit code the guest wrote to the debug-exit port, console)."""
    result = subprocess.run([*prefix, *qemu_command(append, devices, machine)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout)
    assert result.returncode & 1, f"QEMU did not stop through the debug-exit port: {result.stderr}\n{result.stdout}"
    return result.returncode >> 1, result.stdout  # QEMU exits with (code << 1) | 1


def qemu_command(append: str, devices: Sequence[str], machine: Sequence[str]) -> list[str]:
    directory = guests_dir()
    return [QEMU, *machine, "-accel", "kvm", "-m", "128M", "-nodefaults", "-no-user-config", "-nographic",
            "-no-reboot", "-serial", "stdio", "-kernel", str(directory / "os.elf"),
            "-initrd", str(directory / "os-programs.img"), "-append", append,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", *devices]


def disk(path: Path, name: str, serial: str = "", readonly: bool = False) -> list[str]:
    serial_option = f",serial={serial}" if serial else ""
    return ["-device", f"virtio-blk-device,drive={name}{serial_option}",
            "-drive", f"id={name},file={path},format=raw,if=none{',readonly=on' if readonly else ''}"]


def raw_file(tmp_path: Path, name: str, mib: int) -> Path:
    path = tmp_path / name
    with path.open("wb") as file:
        file.truncate(mib << 20)
    return path


def pattern(seed: int, first: int, count: int) -> bytes:
    """What `blk mode=write seed=E` writes into sectors [first, first + count): blk.c's pattern_word."""
    words = []
    offset = (seed + 1) * GOLDEN
    for sector in range(first, first + count):
        base = sector * 64 + offset
        for index in range(64):
            z = (base + index) & MASK
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
            words.append(z ^ (z >> 31))
    return struct.pack(f"<{len(words)}Q", *words)


def lines(console: str, expression: str) -> list[re.Match[str]]:
    return list(re.finditer(expression, console, re.MULTILINE))


def expect(console: str, *expressions: str) -> None:
    for expression in expressions:
        assert re.search(expression, console, re.MULTILINE), f"no line matches {expression!r} in:\n{console}"


def no_failures(console: str) -> None:
    assert not re.search(r"^FAIL:", console, re.MULTILINE), console


def test_devices_are_found_from_the_command_line_and_listed(tmp_path: Path) -> None:
    first, second = raw_file(tmp_path, "a.img", 4), raw_file(tmp_path, "b.img", 4)
    devices = [*disk(first, "d0"), "-device", "virtio-rng-device", *disk(second, "d1", readonly=True)]
    # An empty transport named on purpose, and QEMU's own words appended after it.
    code, console = run_qemu("virtio_mmio.device=512@0xfeb00000:5", devices)
    expect(console,
           r"^os: virtio-mmio at 0xfeb00000 irq 5: no device \(DeviceID 0\), skipped$",
           r"^os: virtio 0: base 0xfeb00e00 size 0x200 irq 12: device 2 \(block\), vendor 0x554d4551$",
           r"^os: virtio 1: base 0xfeb00c00 size 0x200 irq 11: device 4 \(entropy\), vendor 0x554d4551$",
           r"^os: virtio 2: base 0xfeb00a00 size 0x200 irq 10: device 2 \(block\), vendor 0x554d4551$",
           r"^os: nothing to run")  # the words were all the command line held: they are not programs
    assert code == 0


def test_legacy_transports_are_skipped_with_a_reason() -> None:
    code, console = run_qemu("", ["-device", "virtio-rng-device"], machine=["-M", "microvm,acpi=off"])
    expect(console, r"^os: virtio-mmio at 0xfeb00e00 irq 12: version 1 \(only 2, virtio 1\.x, is supported\), "
                    r"skipped$")
    assert not lines(console, r"^os: virtio \d+:")
    assert code == 0


@pytest.mark.parametrize("wait", ["poll", "irq"])
def test_rng_reads_random_bytes(wait: str) -> None:
    code, console = run_qemu(f"rng bytes=16384 wait={wait}", ["-device", "virtio-rng-device"])
    expect(console, rf"^rng 1: virtio 0 \(irq 12\): features 0x[0-9a-f]+, queue size \d+, wait {wait}$",
           r"^PASS: rng 1: 16384 bytes are not all the same \(\d+ distinct values\)$",
           r"^PASS: rng 1: byte histogram is plausible: chi-square \d+\.\d\d within 150\.\.400$")
    interrupts = int(lines(console, r"^os: virtio 0 \(entropy\): (\d+) interrupts$")[0][1])
    assert (interrupts > 0) == (wait == "irq"), console  # polling never unmasks the interrupt
    no_failures(console)
    assert code == 0


@pytest.mark.parametrize("wait", ["poll", "irq"])
def test_blk_writes_a_pattern_the_host_reads_back(tmp_path: Path, wait: str) -> None:
    image = raw_file(tmp_path, "disk.img", 8)
    first, count, seed = 100, 1001, 42  # not a whole number of 4 KiB requests: the last one is short
    code, console = run_qemu(f"blk mode=id,write,flush,verify,read start={first} sectors={count} seed={seed} qd=4 "
                             f"wait={wait}", disk(image, "d0", serial="pyrovisor-disk"))
    expect(console,
           rf"^blk 1: virtio 0 \(irq 12\): capacity 16384 sectors \(8 MiB\), blk_size 512, read-write, flush yes, "
           rf"features 0x[0-9a-f]+, queue size \d+( \(indirect\))?, wait {wait}$",
           r"^blk 1: serial 'pyrovisor-disk'$",
           r"^PASS: blk 1: get-id completed with status 0 \(OK\)$",
           rf"^PASS: blk 1: wrote {count} sectors from sector {first} with seed {seed} in 126 requests \(bs 4096, "
           r"qd 4\) in \d+ us$",
           r"^PASS: blk 1: flush completed with status 0 \(OK\)$",
           rf"^PASS: blk 1: verified {count} sectors from sector {first} with seed {seed}: all match$")
    data = image.read_bytes()
    expected = pattern(seed, first, count)
    assert data[first * 512:(first + count) * 512] == expected
    assert data[:first * 512].count(0) == first * 512 and not any(data[(first + count) * 512:])
    total = sum(struct.unpack(f"<{len(expected) // 8}Q", expected)) & MASK
    expect(console, rf"^blk 1: read {count} sectors from sector {first}: sum of 64-bit words 0x{total:016x}$")
    counts = lines(console, r"^blk 1: (\d+) notifies, (\d+) waits, (\d+) interrupts$")[0]
    if wait == "poll":
        assert counts[2] == "0" and counts[3] == "0", counts[0]  # no system call per I/O
    else:
        assert int(counts[2]) > 0 and int(counts[3]) > 0, counts[0]
    no_failures(console)
    assert code == 0


def test_a_read_only_disk_refuses_writes(tmp_path: Path) -> None:
    image = raw_file(tmp_path, "ro.img", 2)
    code, console = run_qemu("blk mode=write,verify sectors=64 seed=5", disk(image, "d0", readonly=True))
    expect(console, r"^blk 1: virtio 0 \(irq 12\): capacity 4096 sectors \(2 MiB\), blk_size 512, read-only,",
           r"^PASS: blk 1: write to the read-only device refused with status 1 \(IOERR\)$",
           r"^FAIL: blk 1: verify: 64 of 64 sectors from sector 0 differ from seed 5's pattern, the first is sector 0$")
    assert not any(image.read_bytes())
    assert code == 1  # the verify's FAIL: nothing was written


def test_two_disks_are_told_apart_by_dev(tmp_path: Path) -> None:
    first, second = raw_file(tmp_path, "first.img", 4), raw_file(tmp_path, "second.img", 4)
    code, console = run_qemu("blk dev=0 mode=id,write sectors=256 seed=1; blk dev=1 mode=id,write sectors=256 "
                             "seed=2 wait=irq", [*disk(first, "d0", serial="first"), *disk(second, "d1",
                                                                                              serial="second")])
    expect(console, r"^blk 1: virtio 0 \(irq 12\): capacity 8192 sectors", r"^blk 1: serial 'first'$",
           r"^blk 2: virtio 1 \(irq 11\): capacity 8192 sectors", r"^blk 2: serial 'second'$",
           r"^os: all 2 processes exited, 0 failed")
    assert first.read_bytes()[:256 * 512] == pattern(1, 0, 256)
    assert second.read_bytes()[:256 * 512] == pattern(2, 0, 256)
    no_failures(console)
    assert code == 0


def test_a_device_belongs_to_one_process_until_it_exits(tmp_path: Path) -> None:
    image = raw_file(tmp_path, "disk.img", 4)
    # Two processes ask for the same disk at once: one gets it. A third asks after both exited: the device
    # was released (kernel keepmm=1 keeps the address spaces, not the devices).
    code, console = run_qemu("blk mode=bench ops=20000 qd=16; blk mode=bench ops=20000 qd=16; blk mode=id "
                             "start_ms=1500; kernel keepmm=1", disk(image, "d0", serial="shared"))
    busy = lines(console, r"^blk [12]: cannot open virtio device 2 #0: another process has it \(E_BUSY\) \(-16\)$")
    assert len(busy) == 1, console
    assert len(lines(console, r"^PASS: blk [12]: bench finished 20000 ops, 0 errors$")) == 1, console
    expect(console, r"^blk 3: serial 'shared'$", r"^PASS: blk 3: get-id completed with status 0 \(OK\)$",
           r"^os: all 3 processes exited, 1 failed")
    assert code == 1


def test_bench_reports_iops_and_bandwidth(tmp_path: Path) -> None:
    image = raw_file(tmp_path, "bench.img", 16)
    code, console = run_qemu("blk mode=bench ops=2000 qd=16 bs=4k sectors=32768; blk mode=bench rw=write "
                             "access=seq ops=200 qd=4 bs=64k sectors=32768 wait=irq start_ms=2000",
                             disk(image, "d0"))
    first = lines(console, r"^blk 1: bench rw=read access=rand bs=4096 qd=16 wait=poll: 2000 ops in (\d+) us: "
                           r"(\d+) IOPS, (\d+)\.(\d) MB/s, latency mean (\d+) us max (\d+) us, \d+ notifies, "
                           r"0 interrupts$")
    second = lines(console, r"^blk 2: bench rw=write access=seq bs=65536 qd=4 wait=irq: 200 ops in (\d+) us: "
                            r"(\d+) IOPS, (\d+)\.(\d) MB/s, latency mean \d+ us max \d+ us, \d+ notifies, "
                            r"(\d+) interrupts$")
    assert first and second, console
    us, iops = int(first[0][1]), int(first[0][2])
    assert abs(iops - 2000 * 1_000_000 // us) <= 1
    assert int(second[0][5]) > 0
    no_failures(console)
    assert code == 0


def test_command_line_words_are_taken_out_wherever_they_are(tmp_path: Path) -> None:
    image = raw_file(tmp_path, "disk.img", 2)
    # ACPI on: nothing is appended, the devices sit on the second IOAPIC (GSI 46 and 47), so the words here
    # are the only way to find them; they appear inside a program's arguments, as a segment of their own and
    # inside the kernel segment.
    append = ("rng wait=irq virtio_mmio.device=512@0xfeb02c00:46 bytes=4096; virtio_mmio.device=0x200@0xfeb02e00:47;"
              " blk mode=id wait=irq start_ms=300; kernel hz=100 virtio_mmio.device=1K@0xfeb02a00:45")
    code, console = run_qemu(append, ["-device", "virtio-rng-device", *disk(image, "d0", serial="acpi")],
                             machine=MICROVM_ACPI)
    expect(console,
           r"^pyrovisor os: 1 vCPU\(s\), 128 MiB, \d+ programs in the archive, 2 to run, 100 Hz$",
           r"^os: virtio-mmio at 0xfeb02a00 irq 45: no device \(DeviceID 0\), skipped$",
           r"^os: virtio 0: base 0xfeb02c00 size 0x200 irq 46: device 2 \(block\), vendor 0x554d4551$",
           r"^os: virtio 1: base 0xfeb02e00 size 0x200 irq 47: device 4 \(entropy\)",
           r"^PASS: rng 1: 4096 bytes are not all the same",
           r"^blk 2: serial 'acpi'$")
    started = lines(console, r"^os: pid 1 rng started \[(.*)\]$")[0][1]
    assert started.split() == ["wait=irq", "bytes=4096"]
    assert int(lines(console, r"^os: virtio 1 \(entropy\): (\d+) interrupts$")[0][1]) > 0
    no_failures(console)
    assert code == 0


def run_qemu_watching(command: Sequence[str], on_line: Callable[[str], None], timeout: float = 60) -> tuple[int, str]:
    """Runs QEMU, calling on_line for each console line as it comes; (guest exit code, console)."""
    code, console = watched_process.run_watching(command, on_line, timeout)
    assert code & 1, f"QEMU did not stop through the debug-exit port:\n{console}"
    return code >> 1, console


@contextlib.contextmanager
def vsock_backend() -> Iterator[tuple[VsockBackend, list[str]]]:
    """The backend, listening on a socket in a short-named directory (unix socket paths are short), and the
    QEMU arguments that connect a vhost-user-vsock device to it (guest memory must be shareable)."""
    with tempfile.TemporaryDirectory(prefix="vsock-") as directory:
        path = os.path.join(directory, "vsock.sock")
        backend = VsockBackend(path)
        try:
            yield backend, ["-object", "memory-backend-memfd,id=mem,size=128M,share=on",
                            "-chardev", f"socket,id=vs,path={path}", "-device", "vhost-user-vsock-device,chardev=vs"]
        finally:
            backend.close()
        assert not backend.errors, backend.errors + backend.log
        assert not backend.unknown_requests, backend.unknown_requests


VSOCK_MACHINE = ["-M", "microvm,acpi=off,memory-backend=mem", "-global", "virtio-mmio.force-legacy=false"]


@pytest.mark.parametrize("wait", ["poll", "irq"])
def test_vsock_connects_to_the_host_and_reads_the_reply(wait: str) -> None:
    with vsock_backend() as (backend, devices):
        code, console = run_qemu_watching(qemu_command(
            f"vsock connect port={SERVICE_PORT} msg=ping-from-the-guest wait={wait}", devices, VSOCK_MACHINE),
            lambda line: None)
    expect(console, rf"^vsock 1: virtio 0 \(irq 12\): guest cid 3, features 0x[0-9a-f]+, wait {wait}$",
           rf"^vsock 1: connecting to cid 2 port {SERVICE_PORT} from port \d+$",
           r"^vsock 1: connected, peer buf_alloc 16384$",
           r"^vsock 1: sent 20 bytes: 'ping-from-the-guest'$",
           r"^vsock 1: reply 'pong: ping-from-the-guest'$",
           r"^vsock 1: closed: SHUTDOWN sent, RST received$",
           rf"^PASS: vsock 1: connect cid 2 port {SERVICE_PORT}: sent 20 bytes, received 26 bytes$")
    assert [request[0] for request in backend.requests] == [3]
    (connection,) = backend.connections.values()
    assert connection.closed and not connection.reset_by_guest  # the guest shut down; the host sent the RST
    no_failures(console)
    assert code == 0


def test_vsock_connection_to_a_closed_port_is_refused() -> None:
    with vsock_backend() as (_, devices):
        code, console = run_qemu_watching(qemu_command("vsock connect port=4321", devices, VSOCK_MACHINE),
                                          lambda line: None)
    expect(console, r"^FAIL: vsock 1: connect to cid 2 port 4321: refused \(RST\)$")
    assert code == 1


@pytest.mark.parametrize("wait", ["poll", "irq"])
def test_vsock_listens_and_echoes_within_the_credit(wait: str) -> None:
    data = os.urandom(200 * 1024)  # three times the guest's buf_alloc, twelve times the host's
    with vsock_backend() as (backend, devices):
        connections = []

        def on_line(line: str) -> None:
            if line.startswith("vsock 1: listening on cid 3 port 5000"):
                connections.append(backend.connect(5000, data))

        code, console = run_qemu_watching(qemu_command(f"vsock listen port=5000 wait={wait}", devices,
                                                       VSOCK_MACHINE), on_line)
    (connection,) = connections
    assert bytes(connection.received) == data  # every byte back, in order, never beyond the host's credit
    assert connection.closed and connection.reset_by_guest  # the host shut down; the guest answered RST
    expect(console, r"^vsock 1: accepted cid 2 port 5555$",
           r"^vsock 1: connection from cid 2 port 5555: echoed 204800 bytes, closed: the peer shut down, RST sent$",
           r"^PASS: vsock 1: listen port 5000: 1 connections, 204800 bytes echoed$")
    no_failures(console)
    assert code == 0


def test_vsock_without_a_device_says_so() -> None:
    code, console = run_qemu("vsock connect port=1234", [])
    expect(console, r"^vsock 1: cannot open virtio device 19 #0: no such device \(E_NODEV\) \(-19\)$",
           r"^FAIL: vsock 1: no usable virtio vsock device #0$")
    assert code == 1


# --- virtio-net, reached from a network namespace through a tap device ----------------------------------------
GUEST_IP, HOST_IP, GUEST_MAC = "10.99.0.2", "10.99.0.1", "52:54:00:12:34:56"

PROBE = r"""
import json, socket, struct, sys
guest, host, guest_mac = sys.argv[1], sys.argv[2], sys.argv[3]
result = {}
def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
# ARP: one request, by hand (the kernel has a permanent entry and sends none itself).
mac = bytes.fromhex(open("/sys/class/net/tap0/address").read().strip().replace(":", ""))
arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
arp.bind(("tap0", 0))
arp.settimeout(5)
request = (b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac
           + socket.inet_aton(host) + b"\0" * 6 + socket.inet_aton(guest))
arp.send(request)
while True:
    frame = arp.recv(2048)
    if frame[12:14] == b"\x08\x06" and struct.unpack("!H", frame[20:22])[0] == 2:
        break
result["arp"] = {"sender_mac": frame[22:28].hex(":"), "sender_ip": socket.inet_ntoa(frame[28:32]),
                 "target_mac": frame[32:38].hex(":"), "frame_to": frame[0:6].hex(":")}
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(5)
result["udp"] = []
for size in (1, 100, 1400):
    message = bytes(range(256)) * 6
    udp.sendto(message[:size], (guest, 7))
    data, address = udp.recvfrom(4096)
    result["udp"].append([data == message[:size], address[0], address[1]])
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
icmp.settimeout(5)
result["icmp"] = []
for sequence in range(3):
    payload = b"pyrovisor ping %d" % sequence
    header = struct.pack("!BBHHH", 8, 0, 0, 0x4242, sequence)
    icmp.sendto(struct.pack("!BBHHH", 8, 0, checksum(header + payload), 0x4242, sequence) + payload, (guest, 0))
    while True:
        packet, address = icmp.recvfrom(4096)
        reply = packet[(packet[0] & 15) * 4:]
        if reply[0] == 0:
            break
    kind, code, _, ident, seq = struct.unpack("!BBHHH", reply[:8])
    result["icmp"].append([kind, code, ident, seq, reply[8:] == payload, checksum(reply) == 0,
                           checksum(packet[:(packet[0] & 15) * 4]) == 0])
print(json.dumps(result))
"""


@contextlib.contextmanager
def network_namespace() -> Iterator[str]:
    """A namespace holding tap0 (HOST_IP/24), with a permanent neighbour entry for the guest."""
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed, so no network namespace and tap device")
    name = f"pyrovisor-virtio-{os.getpid()}"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode:
        pytest.skip(f"cannot create a network namespace (needs root): {created.stderr.strip()}")
    try:
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "tuntap", "add", "tap0", "mode", "tap"],
                        ["ip", "link", "set", "tap0", "up"], ["ip", "addr", "add", f"{HOST_IP}/24", "dev", "tap0"],
                        ["ip", "neigh", "add", GUEST_IP, "lladdr", GUEST_MAC, "dev", "tap0", "nud", "permanent"]):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("wait", ["poll", "irq"])
def test_net_answers_arp_ping_and_udp(wait: str) -> None:
    with network_namespace() as namespace:
        probes: list[subprocess.CompletedProcess[str]] = []

        def on_line(line: str) -> None:
            if line.startswith("net 1: ready"):  # the guest counts 7 answers, then exits
                probes.append(subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", PROBE, GUEST_IP,
                                              HOST_IP, GUEST_MAC], capture_output=True, text=True, timeout=60))

        code, console = run_qemu_watching(["ip", "netns", "exec", namespace, *qemu_command(
            f"net ip={GUEST_IP}/24 port=7 count=7 wait={wait}",
            ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
             "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}"], MICROVM)], on_line)
    (probe,) = probes
    assert probe.returncode == 0, probe.stderr + console
    result = json.loads(probe.stdout)
    assert result["arp"] == {"sender_mac": GUEST_MAC, "sender_ip": GUEST_IP, "target_mac": result["arp"]["frame_to"],
                             "frame_to": result["arp"]["frame_to"]}
    assert all(ok and address == GUEST_IP and port == 7 for ok, address, port in result["udp"]), result
    assert [entry[:4] for entry in result["icmp"]] == [[0, 0, 0x4242, sequence] for sequence in range(3)]
    assert all(all(entry[4:]) for entry in result["icmp"]), result  # payload back, ICMP and IP checksums right
    expect(console, rf"^net 1: virtio 0 \(irq 12\): mac {GUEST_MAC}, ip {GUEST_IP}/24, udp port 7, "
                    rf"features 0x[0-9a-f]+, \d+ receive buffers, wait {wait}$",
           r"^net 1: handled 1 ARP requests, 3 ICMP echo requests, 3 UDP datagrams \(1501 bytes\); received \d+ "
           r"frames, sent 7, dropped 0 \(malformed or bad checksum\), ignored \d+$",
           r"^PASS: net 1: answered 7 requests in \d+ ms$")
    no_failures(console)
    assert code == 0
