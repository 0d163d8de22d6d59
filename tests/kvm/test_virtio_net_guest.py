"""pyrovisor's virtio-net with the OS guest's `net` program on a tap in a network namespace the test makes: the
host's kernel resolves the guest by ARP, pings it and gets UDP datagrams of 1, 100 and 1400 bytes echoed
byte-exact, in both wait modes; the guest's summary counts them; a snapshot restored onto the same tap carries
on; bad --net options give one error line."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from netns import netns_unavailable

import watched_process
from pyrovisor.devices.virtio.net import default_mac

pytestmark = pytest.mark.kvm

SUBNET = "10.231.52"
GUEST, HOST = f"{SUBNET}.2", f"{SUBNET}.1"
TAP = "pvnet0"
PR_CAPBSET_DROP, CAP_NET_ADMIN = 24, 12

# Run inside the namespace: three pings (the ping command where it is installed, else ICMP echo requests by
# hand, checked the same way), then UDP datagrams of 1, 100 and 1400 bytes to the guest's echo port.
PROBE = r"""
import json, shutil, socket, struct, subprocess, sys
guest = sys.argv[1]
result = {}
def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
if shutil.which("ping"):
    done = subprocess.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", guest], capture_output=True, text=True)
    replies = [int(n) for n in __import__("re").findall(r"icmp_seq=(\d+)", done.stdout)]
    result["ping"] = {"tool": "ping", "code": done.returncode, "replies": replies, "output": done.stdout}
else:
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    icmp.settimeout(5)
    replies = []
    for sequence in range(1, 4):
        payload = b"pyrovisor ping %d" % sequence
        header = struct.pack("!BBHHH", 8, 0, 0, 0x4242, sequence)
        icmp.sendto(struct.pack("!BBHHH", 8, 0, checksum(header + payload), 0x4242, sequence) + payload, (guest, 0))
        while True:
            packet, _ = icmp.recvfrom(4096)
            reply = packet[(packet[0] & 15) * 4:]
            if reply[0] == 0:
                break
        kind, code, ident, seq = struct.unpack("!BBxxHH", reply[:8])
        if (kind, code, ident) == (0, 0, 0x4242) and reply[8:] == payload and checksum(reply) == 0:
            replies.append(seq)
    result["ping"] = {"tool": "raw ICMP", "code": 0 if len(replies) == 3 else 1, "replies": replies, "output": ""}
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(5)
result["udp"] = []
for size in (1, 100, 1400):
    message = bytes(range(256)) * 6
    udp.sendto(message[:size], (guest, 7))
    data, address = udp.recvfrom(4096)
    result["udp"].append([size, data == message[:size], address[0], address[1]])
print(json.dumps(result))
"""


@contextlib.contextmanager
def tap_namespace(make_tap: bool = True) -> Iterator[str]:
    """A namespace holding the tap TAP (HOST/24, up) for the guest, made and removed by the test."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    name = f"pyrovisor-vnet-{os.getpid()}"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode:
        pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
    try:
        commands = [["link", "set", "lo", "up"]]
        if make_tap:
            commands += [["tuntap", "add", TAP, "mode", "tap"], ["addr", "add", f"{HOST}/24", "dev", TAP],
                         ["link", "set", TAP, "up"]]
        for command in commands:
            subprocess.run(["ip", "-n", name, *command], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def pyrovisor(namespace: str, *flags: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, sys.executable, "-m", "pyrovisor", "run", "os", "--memory", "128M",
            "--vcpus", "1", "--timeout", "60", *flags]


def run_watching(command: Sequence[str], on_line: Callable[[str], None], timeout: float = 90) -> tuple[int, str]:
    """Run pyrovisor, calling on_line for each console line as it comes; (exit code, console and errors)."""
    return watched_process.run_watching(command, on_line, timeout)


@pytest.mark.parametrize(("wait", "mac"), [("poll", ""), ("irq", "52:54:00:12:34:56")])
def test_the_guest_answers_arp_ping_and_udp_through_the_tap(wait: str, mac: str) -> None:
    expected_mac = mac or default_mac(TAP)
    with tap_namespace() as namespace:
        probes: list[subprocess.CompletedProcess[str]] = []
        neighbours: list[str] = []

        def on_line(line: str) -> None:
            if line.startswith("net 1: ready"):  # 1 ARP request, 3 pings, 3 datagrams: then the guest exits
                probes.append(subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", PROBE, GUEST],
                                             capture_output=True, text=True, timeout=60))
                neighbours.append(subprocess.run(["ip", "-n", namespace, "neigh", "show", GUEST, "dev", TAP],
                                                 capture_output=True, text=True).stdout)

        net = f"tap={TAP}" + (f",mac={mac}" if mac else "")
        code, console = run_watching(pyrovisor(namespace, "--net", net, "--args",
                                               f"net ip={GUEST}/24 port=7 count=7 wait={wait}"), on_line)
    (probe,), (neighbour,) = probes, neighbours
    assert probe.returncode == 0, probe.stderr + console
    result = json.loads(probe.stdout)
    ping = result["ping"]
    assert ping["code"] == 0 and ping["replies"] == [1, 2, 3], ping
    assert result["udp"] == [[size, True, GUEST, 7] for size in (1, 100, 1400)], result
    assert f"lladdr {expected_mac}" in neighbour, "the host learnt the guest's MAC from its ARP reply"
    assert re.search(r"^os: virtio 0: base 0xc0000000 size 0x1000 irq 5: device 1 \(network\)", console, re.M)
    assert re.search(rf"^net 1: virtio 0 \(irq 5\): mac {expected_mac}, ip {GUEST}/24, udp port 7, "
                     rf"features 0x130000020, 128 receive buffers, wait {wait}$", console, re.M), console
    assert re.search(r"^net 1: handled 1 ARP requests, 3 ICMP echo requests, 3 UDP datagrams \(1501 bytes\); "
                     r"received \d+ frames, sent 7, dropped 0 \(malformed or bad checksum\), ignored \d+$",
                     console, re.M), console
    assert re.search(r"^PASS: net 1: answered 7 requests in \d+ ms$", console, re.M), console
    interrupts = re.search(r"^net 1: \d+ notifies, \d+ waits, (\d+) interrupts$", console, re.M)
    assert interrupts is not None and (int(interrupts.group(1)) > 0) == (wait == "irq"), console
    assert not re.search(r"^FAIL:", console, re.M)
    assert code == 0, console


def _without_net_admin() -> None:
    """In the child before exec: no CAP_NET_ADMIN for pyrovisor, even as root (not in its bounding set)."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_bad_net_options_give_one_error_line() -> None:
    with tap_namespace() as namespace:
        holder = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c",
                                   "import sys; from pyrovisor.devices.virtio.net import open_tap; "
                                   f"open_tap({TAP!r}); print('held', flush=True); sys.stdin.read()"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            cases: list[tuple[list[str], str, Callable[[], None] | None]] = [
                (["--net", "tap=pvmissing"], "tap pvmissing: no such interface, and creating a tap needs "
                                             "CAP_NET_ADMIN", _without_net_admin),
                (["--net", "tap=a-name-too-long-for-linux"], "an interface name of 1 to 15 bytes", None),
                (["--net", f"tap={TAP}"], f"tap {TAP}: busy: another process has it open", None),
                (["--net", "tap=lo"], "tap lo: exists but is not a single-queue tap device", None),
                (["--net", "tap=pvnet1,mac=01:00:5e:00:00:01"], "not multicast", None),
            ]
            for flags, message, preexec in cases:
                bad = subprocess.run(pyrovisor(namespace, *flags, "--args", "net"), capture_output=True, text=True,
                                     timeout=60, preexec_fn=preexec)
                lines = bad.stderr.strip().splitlines()
                assert bad.returncode in (1, 2) and len(lines) == 1, (flags, bad.stderr)
                assert lines[0].startswith("pyrovisor: error:") and message in lines[0], (flags, lines[0])
                assert "net 1:" not in bad.stdout, "nothing started"
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
        links = subprocess.run(["ip", "-n", namespace, "-o", "link", "show"], capture_output=True, text=True).stdout
        assert "pvmissing" not in links and "pvnet1" not in links, "no tap was left behind"


UDP_ONCE = r"""
import socket, sys
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(5)
for size in map(int, sys.argv[2:]):
    message = bytes(range(256)) * 6
    udp.sendto(message[:size], (sys.argv[1], 7))
    data, address = udp.recvfrom(4096)
    assert data == message[:size] and address == (sys.argv[1], 7), (size, data[:20], address)
print("echoed", flush=True)
"""


def test_a_snapshot_restores_onto_the_same_tap_and_the_guest_carries_on(tmp_path: Path) -> None:
    """One datagram echoed, a snapshot, the VMM stopped; the restored VMM reopens the tap by name and the same
    guest program answers three pings and two more datagrams, its counters going on from where they were."""
    mac = "52:54:00:12:34:56"
    with tap_namespace() as namespace:
        # A permanent neighbour entry: the tap loses its carrier between the two VMMs, which would flush a learnt
        # one and make the kernel ask again by ARP (one more answer than the guest's count).
        subprocess.run(["ip", "-n", namespace, "neigh", "add", GUEST, "lladdr", mac, "dev", TAP, "nud", "permanent"],
                       check=True, capture_output=True)
        socket_path, snapshot = tmp_path / "api.sock", tmp_path / "snap"
        in_namespace = ["ip", "netns", "exec", namespace]
        steps: list[str] = []

        def on_line(line: str) -> None:
            if line.startswith("net 1: ready"):
                echoed = subprocess.run([*in_namespace, sys.executable, "-c", UDP_ONCE, GUEST, "100"],
                                        capture_output=True, text=True, timeout=30)
                steps.append(echoed.stdout + echoed.stderr)
                for verb in (["snapshot", str(snapshot)], ["stop"]):
                    done = subprocess.run([sys.executable, "-m", "pyrovisor", "ctl", str(socket_path), *verb],
                                          capture_output=True, text=True, timeout=60)
                    steps.append(f"{verb[0]}: {done.returncode} {done.stderr.strip()}")

        _, first = run_watching(pyrovisor(namespace, "--net", f"tap={TAP},mac={mac}", "--api", str(socket_path),
                                          "--args", f"net ip={GUEST}/24 port=7 count=6 wait=irq"), on_line)
        assert steps == ["echoed\n", "snapshot: 0 ", "stop: 0 "], [*steps, first]
        assert "net 1: handled" not in first, "the first VMM was stopped before the guest finished"
        restored = subprocess.Popen([*in_namespace, sys.executable, "-m", "pyrovisor", "restore", str(snapshot),
                                     "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while "NO-CARRIER" in subprocess.run(["ip", "-n", namespace, "link", "show", TAP], capture_output=True,
                                                 text=True).stdout:  # until the restored VMM has the tap open
                assert time.monotonic() < deadline and restored.poll() is None, restored.communicate()
                time.sleep(0.02)
            probe = subprocess.run([*in_namespace, sys.executable, "-c", PROBE.replace("(1, 100, 1400)", "(1, 1400)"),
                                    GUEST], capture_output=True, text=True, timeout=60)
            out, err = restored.communicate(timeout=60)
        finally:
            if restored.poll() is None:
                restored.kill()
                restored.wait()
    assert probe.returncode == 0, probe.stderr + out + err
    result = json.loads(probe.stdout)
    assert result["ping"]["replies"] == [1, 2, 3] and result["udp"] == [[1, True, GUEST, 7], [1400, True, GUEST, 7]]
    assert re.search(r"^net 1: handled 0 ARP requests, 3 ICMP echo requests, 3 UDP datagrams \(1501 bytes\); "
                     r"received \d+ frames, sent 6, dropped 0", out, re.M), out + err
    assert re.search(r"^PASS: net 1: answered 6 requests in \d+ ms$", out, re.M), out
    assert restored.returncode == 0, out + err
