"""The destination side of a live migration: accept a VM, rebuild it, run it, or discard everything."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyrovisor.arch.x86_64.cpuid import CpuidEntry
from pyrovisor.arch.x86_64.layout import ram_ranges
from pyrovisor.builder import assemble_vm
from pyrovisor.config import MachineConfig
from pyrovisor.errors import ConfigError, MigrationError, PyrovisorError
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.migration import compat
from pyrovisor.migration.address import accept, listen, parse_address
from pyrovisor.migration.auth import authenticate_destination
from pyrovisor.migration.pages import PageReceiver
from pyrovisor.migration.protocol import (
    PAGE_SIZE,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    Connection,
    MessageType,
    Role,
    expect,
    peer_text,
    send_error,
)
from pyrovisor.migration.source import digest_memory
from pyrovisor.persist.codec import decode
from pyrovisor.persist.machine import MachineState, check_machine_state
from pyrovisor.vmm import Vmm

COMMIT_TIMEOUT_S = 30.0
MAX_CPUID_ENTRIES = 256
U32 = 1 << 32
T = TypeVar("T")


@dataclass(frozen=True)
class Arrival:
    """A VM that migrated in and now runs here."""

    vmm: Vmm
    source: str
    rounds: int
    pages_received: int
    bytes_received: int
    downtime_s: float  # the source's pause (its clock) to the resume here


@dataclass(frozen=True)
class Hello:
    """What the source announces: the machine's configuration and RAM, the CPU its guest saw, and who it is."""

    config: MachineConfig
    cpuid: tuple[CpuidEntry, ...]
    tsc_khz: int
    source: str


@dataclass(frozen=True)
class IncomingState:
    """The STATE message: the machine, when the source paused it (its clock), its memory digest (--verify)."""

    machine: MachineState
    paused_at: float | None
    memory_sha256: str | None


HostCheck = Callable[[Hello], None]  # raises MigrationError naming why this host cannot run the guest


def check_this_host(hello: Hello) -> None:
    compat.check_host(hello.cpuid, hello.tsc_khz)


class Incoming:
    """The destination's side of one stream up to the machine state, which needs no KVM: authentication,
    HELLO and WELCOME, page rounds, STATE. Any malformed, hostile or damaged input raises MigrationError."""

    def __init__(self, connection: Connection, psk: bytes | None = None,
                 check_host: HostCheck = check_this_host) -> None:
        self.connection = connection
        self.psk = psk
        self.check_host = check_host
        self.hello: Hello | None = None
        self.memory: GuestMemory | None = None  # the guest's, until taken by the VM
        self.receiver: PageReceiver | None = None
        self.rounds = 0

    def authenticate(self) -> None:
        authenticate_destination(self.connection, self.psk)

    def handshake(self) -> Hello:
        """Read HELLO, check that this host can run the guest, allocate its memory, answer WELCOME."""
        document = expect(self.connection.receive(), MessageType.HELLO).json()
        try:
            hello = parse_hello(document)
            self.check_host(hello)
            self.memory = GuestMemory([MemoryRegion.anonymous(gpa, size, huge_pages=hello.config.huge_pages)
                                       for gpa, size in _ram(hello.config)])
        except PyrovisorError as exc:
            reason = exc.reason if isinstance(exc, MigrationError) else str(exc)
            self.connection.send_json(MessageType.WELCOME, {"accepted": False, "reason": reason})
            raise MigrationError("handshake", f"refused the incoming VM: {reason}") from None
        self.connection.send_json(MessageType.WELCOME, {"accepted": True})
        self.hello = hello
        self.receiver = PageReceiver(self.memory, self.connection)
        return hello

    def receive_memory(self) -> IncomingState:
        """Page rounds until STATE; every page must have arrived intact by then."""
        assert self.receiver is not None and self.hello is not None
        receiver, connection = self.receiver, self.connection
        while True:
            header = connection.receive_header()
            if header.type is MessageType.PAGES:
                receiver.receive(header)
                continue
            frame = expect(connection.receive_frame(header), MessageType.ROUND_END, MessageType.DIRTIED,
                           MessageType.STATE)
            document = frame.json()
            if frame.type is MessageType.STATE:
                receiver.finish()
                return parse_state(document, self.hello.config)
            number = document.get("round")
            if type(number) is not int or number != self.rounds:
                raise MigrationError("stream", f"{frame.type.name} message for round {_shown(number)} during round "
                                     f"{self.rounds}")
            receiver.rewritten(document.get("rewritten"), f"{frame.type.name} message")
            if frame.type is MessageType.ROUND_END:
                receiver.end_round()
                self.rounds += 1

    def take_memory(self) -> GuestMemory:
        memory, self.memory = self.memory, None
        assert memory is not None
        return memory

    def close(self) -> None:
        """Release the guest memory if no VM took it (never raises: the error that led here matters more)."""
        if self.memory is not None:
            with contextlib.suppress(PyrovisorError):
                self.memory.close()
            self.memory = None


def receive(listen_address: str, console_output: Callable[[bytes], None], accept_timeout: float | None = None,
            io_timeout_s: float = 60.0, on_listening: Callable[[], None] | None = None, psk: bytes | None = None,
            insecure: bool = False, on_started: Callable[[Vmm], None] | None = None,
            check_host: HostCheck = check_this_host, listener: socket.socket | None = None) -> Arrival:
    """Wait for one incoming migration and return the VM running here.

    Without a pre-shared key (`psk`), only a loopback address or a Unix socket is listened on, unless
    `insecure`. `on_started` runs once the guest runs here, before the source is told so: if it fails, the VM
    is discarded and the source resumes. Anything wrong — a refused or malformed stream, a failed
    authentication, a wrong memory size, a checksum mismatch, a cut connection, no confirmation that the
    source stopped — discards everything received and raises MigrationError; nothing is left running.
    `listener`: the socket `listen_socket(listen_address, ...)` made earlier (a jailed VMM has no way out to
    make one itself), used instead of listening here.
    """
    server = listener if listener is not None else listen_socket(listen_address, psk, insecure)
    try:
        if on_listening is not None:
            on_listening()
        connection = Connection(accept(server, accept_timeout), Role.DESTINATION)
    finally:
        server.close()
    connection.sock.settimeout(io_timeout_s)
    incoming = Incoming(connection, psk, check_host)
    vmm: Vmm | None = None
    try:
        incoming.authenticate()
        hello = incoming.handshake()
        state = incoming.receive_memory()
        memory = incoming.memory
        assert memory is not None
        digest = digest_memory(memory) if state.memory_sha256 is not None else None
        if digest is not None and digest != state.memory_sha256:
            raise MigrationError("stop-and-copy", "memory checksum mismatch: the guest memory did not arrive intact")
        vmm = assemble_vm(state.machine, incoming.take_memory(), console_output)
        vmm.start()
        if on_started is not None:
            on_started(vmm)
        resumed_at = time.time()
        connection.send_json(MessageType.RESUMED, {"resumed_at": resumed_at, "memory_sha256": digest})
        connection.sock.settimeout(COMMIT_TIMEOUT_S)
        read_stopped(connection)
    except BaseException as exc:
        # This copy goes first (the source resumes on our ERROR: two running copies must never overlap), then
        # the source hears why; cleaning up never replaces the error that brought us here.
        if vmm is not None:
            with contextlib.suppress(Exception):
                vmm.close()
        incoming.close()
        send_error(connection, "destination", exc)
        raise
    finally:
        connection.close()
    assert incoming.receiver is not None
    downtime = resumed_at - state.paused_at if state.paused_at is not None else 0.0
    return Arrival(vmm=vmm, source=hello.source, rounds=incoming.rounds, pages_received=incoming.receiver.pages,
                   bytes_received=connection.bytes_received, downtime_s=downtime)


def listen_socket(listen_address: str, psk: bytes | None, insecure: bool) -> socket.socket:
    """A socket listening on `listen_address`: without a pre-shared key, only a loopback address or a Unix socket
    unless `insecure`."""
    address = parse_address(listen_address)
    if psk is None and not insecure and not address.is_local:
        raise ConfigError("--listen", str(address), "without --psk-file anyone who can reach this address could send "
                          "a VM here and see or alter its memory; give --psk-file FILE (or --insecure to allow it)")
    return listen(address)


def read_stopped(connection: Connection) -> None:
    """The source's confirmation that it stopped: from here on this copy owns the guest."""
    expect(connection.receive(), MessageType.STOPPED).json()


def _ram(config: MachineConfig) -> list[tuple[int, int]]:
    return [(r.gpa, r.size) for r in ram_ranges(config.memory_size)]


def _u32(value: Any) -> bool:
    return type(value) is int and 0 <= value < U32


def parse_hello(document: dict[str, Any]) -> Hello:
    """HELLO checked field by field; MigrationError or ConfigError (a configuration this host refuses)."""
    if document.get("protocol") != PROTOCOL_NAME:
        raise MigrationError("handshake", "not a pyrovisor migration")
    if document.get("version") != PROTOCOL_VERSION:
        raise MigrationError("handshake", f"protocol version {_shown(document.get('version'))} is not supported "
                             f"(this pyrovisor speaks {PROTOCOL_VERSION})")
    if document.get("page_size") != PAGE_SIZE:
        raise MigrationError("handshake", f"page size {_shown(document.get('page_size'))} differs from {PAGE_SIZE}")
    config = _decoded(MachineConfig, document.get("config"), "HELLO.config", "handshake")
    config.validate()
    announced = document.get("ram")
    if announced != [list(pair) for pair in _ram(config)]:
        raise MigrationError("handshake", f"the memory layout does not match {config.memory_size >> 20} MiB of RAM")
    cpuid = document.get("cpuid")
    if not (isinstance(cpuid, list) and len(cpuid) <= MAX_CPUID_ENTRIES
            and all(isinstance(entry, list) and len(entry) == 7 and all(map(_u32, entry)) for entry in cpuid)):
        raise MigrationError("handshake", "malformed HELLO message: 'cpuid' must list [function, index, flags, eax, "
                             "ebx, ecx, edx] entries")
    tsc_khz = document.get("tsc_khz")
    if type(tsc_khz) is not int or tsc_khz < 0:
        raise MigrationError("handshake", "malformed HELLO message: 'tsc_khz' must be a whole number of kHz")
    source = document.get("source")
    return Hello(config=config, cpuid=tuple(CpuidEntry(*entry) for entry in cpuid), tsc_khz=tsc_khz,
                 source=peer_text(source, 64) if isinstance(source, str) else "?")


def parse_state(document: dict[str, Any], config: MachineConfig) -> IncomingState:
    machine = _decoded(MachineState, document.get("machine"), "STATE.machine", "stop-and-copy")
    if machine.config != config:
        raise MigrationError("stop-and-copy", "the machine state does not match the announced configuration")
    try:
        check_machine_state(machine, "STATE")
    except PyrovisorError as exc:
        raise MigrationError("stop-and-copy", str(exc)) from None
    except Exception as exc:  # hostile device state the checks did not foresee
        raise MigrationError("stop-and-copy", f"malformed machine state ({type(exc).__name__})") from None
    paused_at = document.get("paused_at")
    if paused_at is not None and (isinstance(paused_at, bool) or not isinstance(paused_at, int | float)):
        raise MigrationError("stop-and-copy", "malformed STATE message: 'paused_at' must be a time")
    digest = document.get("memory_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise MigrationError("stop-and-copy", "malformed STATE message: 'memory_sha256' must be a SHA-256 digest")
    return IncomingState(machine=machine, paused_at=float(paused_at) if paused_at is not None else None,
                         memory_sha256=digest)


def _shown(value: Any) -> str:
    """A peer's scalar for a message; anything else by its JSON type (never printed whole)."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return peer_text(str(value), 24)
    return f"({type(value).__name__})"


def _decoded(kind: type[T], data: Any, where: str, phase: str) -> T:
    """`decode` whose every failure on hostile input is a MigrationError."""
    try:
        return decode(kind, data, where)
    except PyrovisorError as exc:
        raise MigrationError(phase, str(exc)) from None
    except Exception as exc:  # e.g. an unhashable value where an enum is due
        raise MigrationError(phase, f"{where}: malformed ({type(exc).__name__})") from None
