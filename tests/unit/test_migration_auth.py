"""Pre-shared keys without KVM: the mutual exchange, frame MACs, forged pages, key files, who may connect."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

from pyrovisor.errors import ConfigError, MigrationError
from pyrovisor.memory import GuestMemory, MemoryRegion, PageSet
from pyrovisor.migration.address import listen, parse_address
from pyrovisor.migration.auth import authenticate_destination, authenticate_source, load_psk, session_keys
from pyrovisor.migration.destination import receive
from pyrovisor.migration.pages import PageReceiver, PageSender, SendTally
from pyrovisor.migration.protocol import (
    FRAME,
    PAGE_SIZE,
    PAGES,
    Connection,
    KeyedIntegrity,
    MessageType,
    expect,
    send_error,
)
from pyrovisor.migration.rate import RateLimiter

KEY = b"correct horse battery staple!!"
OTHER_KEY = b"another key of enough length..."


def handshake(pair, source_key: bytes | None, destination_key: bytes | None) -> tuple[BaseException | None, ...]:
    """Both halves of the exchange at once; each side's error (None if it succeeded)."""
    source, destination = pair
    errors: dict[str, BaseException | None] = {"source": None, "destination": None}

    def run(side: str) -> None:
        try:
            if side == "source":
                authenticate_source(source, source_key)
                source.send_json(MessageType.HELLO, {"hello": True})
            else:
                authenticate_destination(destination, destination_key)
                assert expect(destination.receive(), MessageType.HELLO).json() == {"hello": True}
        except MigrationError as exc:
            errors[side] = exc
            send_error(source if side == "source" else destination, side, exc)

    threads = [threading.Thread(target=run, args=(side,)) for side in errors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return errors["source"], errors["destination"]


def test_same_key_authenticates_both_and_switches_to_macs(pair) -> None:
    assert handshake(pair, KEY, KEY) == (None, None)
    source, destination = pair
    assert isinstance(source.integrity, KeyedIntegrity) and isinstance(destination.integrity, KeyedIntegrity)
    assert source.integrity.digest_size == 16


def test_no_key_on_either_side_is_plain_crc(pair) -> None:
    assert handshake(pair, None, None) == (None, None)
    assert not isinstance(pair[0].integrity, KeyedIntegrity)


@pytest.mark.parametrize("source_key, destination_key, source_says, destination_says", [
    (OTHER_KEY, KEY, "does not hold the same pre-shared key", "fails authentication"),
    (None, KEY, "during transfer: destination failed during authentication: the source did not authenticate: this "
                "destination requires a pre-shared key", "the source did not authenticate"),
    (KEY, None, "the destination has no pre-shared key",
     "during transfer: source failed during authentication: the destination has no pre-shared key"),
], ids=["different-keys", "source-without-key", "destination-without-key"])
def test_mismatched_keys_are_refused_by_both(pair, source_key, destination_key, source_says: str,
                                            destination_says: str) -> None:
    source_error, destination_error = handshake(pair, source_key, destination_key)
    assert source_error is not None and destination_error is not None
    assert re.search(source_says, str(source_error)), source_error
    assert re.search(destination_says, str(destination_error)), destination_error


def keyed_pair(pair) -> tuple[Connection, Connection]:
    keys = session_keys(KEY, b"s" * 32, b"d" * 32)
    for connection in pair:
        connection.use_keys(keys)
    return pair


def test_an_altered_or_reflected_frame_fails_authentication(pair) -> None:
    source, destination = keyed_pair(pair)
    source.send_json(MessageType.ROUND_END, {"round": 0, "rewritten": []})
    raw = bytearray(destination.sock.recv(4096))
    raw[-3] ^= 0x01  # a different page run
    source.sock.sendall(raw)  # (through the pair: the destination reads it back)
    with pytest.raises(MigrationError, match="fails authentication"):
        destination.receive()
    # A frame the destination sent cannot be passed back to it as the source's (per-direction keys).
    destination.received, destination.sequence = 0, 0
    destination.send_json(MessageType.ROUND_END, {"round": 0, "rewritten": []})
    source.sock.sendall(source.sock.recv(4096))
    with pytest.raises(MigrationError, match="fails authentication"):
        destination.receive()


def forge_crc(data: bytes, target: int) -> bytes:
    """`data` with its last 4 bytes changed so that its CRC-32 is `target` (CRC is affine over GF(2))."""
    base = bytearray(data)
    base[-4:] = bytes(4)
    zero = zlib.crc32(bytes(len(data)))
    basis: dict[int, tuple[int, int]] = {}  # leading bit → (CRC contribution, which of the 32 bits make it)
    for bit in range(32):
        flipped = bytearray(len(data))
        flipped[len(data) - 4 + bit // 8] = 1 << bit % 8
        value, combination = zlib.crc32(flipped) ^ zero, 1 << bit
        while value:
            top = value.bit_length() - 1
            if top not in basis:
                basis[top] = (value, combination)
                break
            value, combination = value ^ basis[top][0], combination ^ basis[top][1]
    value, combination = target ^ zlib.crc32(base), 0
    while value:
        top = value.bit_length() - 1
        value, combination = value ^ basis[top][0], combination ^ basis[top][1]
    for bit in range(32):
        if combination >> bit & 1:
            base[len(data) - 4 + bit // 8] ^= 1 << bit % 8
    assert zlib.crc32(base) == target
    return bytes(base)


@pytest.mark.parametrize("keyed", [False, True], ids=["crc", "psk"])
def test_forged_page_data_matching_the_crc(pair, keyed: bool) -> None:
    """An attacker on the path replaces a page with its own data, fixed up to the original CRC-32: without a key
    nothing can tell; with one the page digest is keyed BLAKE2b and the forgery is caught."""
    source, destination = keyed_pair(pair) if keyed else pair
    original = bytes(range(256)) * 16
    memory = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    target = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    memory.write(0, original)
    PageSender(memory, source, RateLimiter(None)).send(PageSet.of([0]), SendTally())
    wire = bytearray(destination.sock.recv(65536))
    while len(wire) < FRAME.size + PAGES.size + source.integrity.digest_size + PAGE_SIZE:
        wire += destination.sock.recv(65536)
    evil = forge_crc(b"rm -rf / ".ljust(PAGE_SIZE, b"#"), zlib.crc32(original))
    wire[-PAGE_SIZE:] = evil
    source.sock.sendall(wire)
    incoming = PageReceiver(target, destination)
    incoming.receive(destination.receive_header())
    if keyed:
        with pytest.raises(MigrationError, match="checksum mismatch in 1 page"):
            incoming.end_round()
    else:
        incoming.end_round()
        assert target.read(0, PAGE_SIZE) == evil, "CRC-32 alone cannot stop a forger"
    memory.close()
    target.close()


# --- key files -------------------------------------------------------------------------------------------------
def key_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "psk"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_key_file_is_read_without_trailing_newline(tmp_path: Path) -> None:
    assert load_psk(key_file(tmp_path, KEY + b"\n")) == KEY


@pytest.mark.parametrize("data, mode, reason", [
    (b"short\n", 0o600, "at least 16"),
    (KEY, 0o644, "other users may access it"),
    (b"x" * 5000, 0o600, "longer than 4096"),
])
def test_bad_key_files_are_refused(tmp_path: Path, data: bytes, mode: int, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_psk(key_file(tmp_path, data, mode))
    with pytest.raises(ConfigError, match="No such file"):
        load_psk(tmp_path / "missing")


# --- who can reach the destination ------------------------------------------------------------------------------
def test_unix_listening_socket_is_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        server = listen(parse_address(f"unix:{tmp_path / 'migrate.sock'}"))
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "migrate.sock").st_mode) == 0o600
    finally:
        server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_non_loopback_listening_needs_a_key_or_insecure() -> None:
    with pytest.raises(ConfigError, match="without --psk-file anyone who can reach this address"):
        receive(f"0.0.0.0:{free_port()}", lambda data: None, accept_timeout=0.1)
    with pytest.raises(MigrationError, match="no source connected"):
        receive(f"0.0.0.0:{free_port()}", lambda data: None, accept_timeout=0.1, insecure=True)
    with pytest.raises(MigrationError, match="no source connected"):
        receive(f"0.0.0.0:{free_port()}", lambda data: None, accept_timeout=0.1, psk=KEY)
    with pytest.raises(MigrationError, match="no source connected"):
        receive(f"127.0.0.1:{free_port()}", lambda data: None, accept_timeout=0.1)


def test_receive_command_refuses_a_public_address_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "receive", "--listen", "0.0.0.0:4444"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrovisor: error: invalid --listen '0.0.0.0:4444'"), lines
    assert "--psk-file" in lines[0] and "--insecure" in lines[0]
    short = key_file(tmp_path, b"short")
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "receive", "--listen", "0.0.0.0:4444",
                             "--psk-file", str(short)], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1 and "at least 16" in result.stderr
