"""Pre-shared-key authentication of a migration stream: mutual HMAC-SHA256 challenge-response, then session keys."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from pyrovisor.errors import ConfigError, MigrationError
from pyrovisor.migration.protocol import (
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    Connection,
    MessageType,
    SessionKeys,
    expect,
)

# The exchange, before HELLO (each message one AUTH frame):
#   source → destination  {"protocol", "version", "auth": "psk" | "none", "nonce": Ns}
#   destination → source  {"auth": "psk", "nonce": Nd, "proof": HMAC(PSK, "destination proof" | Ns | Nd)}
#                         or {"auth": "none"} when the destination has no key
#   source → destination  {"proof": HMAC(PSK, "source proof" | Ns | Nd)}, the first frame under the session key
# Each side checks the other's proof over its own fresh nonce, so neither a replay nor a reflection passes.
# Every later frame carries HMAC-SHA256 under a per-direction key, and pages a keyed BLAKE2b digest, both
# derived from HMAC(PSK, "session" | Ns | Nd). It authenticates the stream; it does not encrypt it.
NONCE_SIZE = 32
PSK_MIN_BYTES = 16
PSK_MAX_BYTES = 4096
LABEL = b"pyrovisor-migration-2 "


def load_psk(path: Path | str) -> bytes:
    """The pre-shared key in `path`: its bytes without trailing white space, 16 to 4096 of them, in a file
    that only its owner can read or write."""
    shown = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError("--psk-file", shown, exc.strerror or str(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("--psk-file", shown, "not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError("--psk-file", shown, f"other users may access it (mode {info.st_mode & 0o777:o}): "
                              f"chmod 600 {shown}")
        data = os.read(fd, PSK_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError("--psk-file", shown, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    key = data.rstrip(b" \t\r\n")
    if len(data) > PSK_MAX_BYTES:
        raise ConfigError("--psk-file", shown, f"longer than {PSK_MAX_BYTES} bytes")
    if len(key) < PSK_MIN_BYTES:
        raise ConfigError("--psk-file", shown, f"holds {len(key)} bytes; a key needs at least {PSK_MIN_BYTES} "
                          "(e.g. head -c 32 /dev/urandom | base64 > FILE)")
    return key


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def proof(psk: bytes, prover: str, source_nonce: bytes, destination_nonce: bytes) -> bytes:
    """What `prover` ("source" or "destination") sends to show it holds the key, bound to both nonces."""
    return _mac(psk, LABEL, prover.encode(), b" proof", source_nonce, destination_nonce)


def session_keys(psk: bytes, source_nonce: bytes, destination_nonce: bytes) -> SessionKeys:
    session = _mac(psk, LABEL, b"session", source_nonce, destination_nonce)
    return SessionKeys(source_frames=_mac(session, b"frames from the source"),
                       destination_frames=_mac(session, b"frames from the destination"),
                       pages=_mac(session, b"page digests"))


def _hex_field(document: dict[str, Any], name: str, size: int) -> bytes:
    value = document.get(name)
    if not isinstance(value, str) or len(value) != 2 * size:
        raise MigrationError("authentication", f"malformed AUTH message: '{name}' must be {2 * size} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MigrationError("authentication", f"malformed AUTH message: '{name}' must be {2 * size} hex digits") from None


def authenticate_source(connection: Connection, psk: bytes | None) -> None:
    """The source's half of the exchange; afterwards `connection` uses the session keys (with a key)."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    connection.send_json(MessageType.AUTH, {"protocol": PROTOCOL_NAME, "version": PROTOCOL_VERSION,
                                            "auth": "psk" if psk is not None else "none", "nonce": nonce.hex()})
    reply = expect(connection.receive(), MessageType.AUTH).json()
    mode = reply.get("auth")
    if mode not in ("psk", "none"):
        raise MigrationError("authentication", "malformed AUTH message: unknown mode")
    if psk is None:
        if mode != "none":
            raise MigrationError("authentication", "the destination requires a pre-shared key (--psk-file)")
        return
    if mode != "psk":
        raise MigrationError("authentication", "the destination has no pre-shared key: not sending the VM to an "
                             "unauthenticated peer")
    their_nonce = _hex_field(reply, "nonce", NONCE_SIZE)
    their_proof = _hex_field(reply, "proof", hashlib.sha256().digest_size)
    if not hmac.compare_digest(their_proof, proof(psk, "destination", nonce, their_nonce)):
        raise MigrationError("authentication", "the destination does not hold the same pre-shared key (or the "
                             "stream was altered)")
    connection.use_keys(session_keys(psk, nonce, their_nonce))
    connection.send_json(MessageType.AUTH, {"proof": proof(psk, "source", nonce, their_nonce).hex()})


def authenticate_destination(connection: Connection, psk: bytes | None) -> None:
    """The destination's half; with a key, a source that does not prove it holds the same key is refused."""
    first = expect(connection.receive(), MessageType.AUTH).json()
    if first.get("protocol") != PROTOCOL_NAME:
        raise MigrationError("handshake", "not a pyrovisor migration")
    if first.get("version") != PROTOCOL_VERSION:
        raise MigrationError("handshake", "the source's AUTH message names another protocol version")
    mode = first.get("auth")
    if mode not in ("psk", "none"):
        raise MigrationError("authentication", "malformed AUTH message: unknown mode")
    if psk is None:
        connection.send_json(MessageType.AUTH, {"auth": "none"})  # a source with a key refuses this itself
        return
    if mode != "psk":
        raise MigrationError("authentication", "the source did not authenticate: this destination requires a "
                             "pre-shared key (--psk-file on both sides)")
    their_nonce = _hex_field(first, "nonce", NONCE_SIZE)
    nonce = secrets.token_bytes(NONCE_SIZE)
    connection.send_json(MessageType.AUTH, {"auth": "psk", "nonce": nonce.hex(),
                                            "proof": proof(psk, "destination", their_nonce, nonce).hex()})
    connection.use_keys(session_keys(psk, their_nonce, nonce))
    answer = expect(connection.receive(), MessageType.AUTH).json()  # its tag already needs the session key
    their_proof = _hex_field(answer, "proof", hashlib.sha256().digest_size)
    if not hmac.compare_digest(their_proof, proof(psk, "source", their_nonce, nonce)):
        raise MigrationError("authentication", "the source does not hold the same pre-shared key")
