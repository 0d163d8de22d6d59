"""The destination side of a live migration: accept a VM, rebuild it, run it, or discard everything."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyrovisor.arch.x86_64.layout import ram_ranges
from pyrovisor.builder import assemble_vm
from pyrovisor.config import MachineConfig
from pyrovisor.errors import MigrationError, PyrovisorError
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.migration.address import accept, listen, parse_address
from pyrovisor.migration.pages import PageReceiver
from pyrovisor.migration.protocol import PAGE_SIZE, PROTOCOL_VERSION, Connection, MessageType, expect
from pyrovisor.migration.source import digest_memory
from pyrovisor.snapshot.chain import check_machine_state
from pyrovisor.snapshot.codec import decode
from pyrovisor.snapshot.state import MachineState
from pyrovisor.vmm import Vmm

COMMIT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Arrival:
    """A VM that migrated in and now runs here."""

    vmm: Vmm
    source: str
    rounds: int
    pages_received: int
    bytes_received: int
    downtime_s: float  # the source's pause (its clock) to the resume here


def receive(listen_address: str, console_output: Callable[[bytes], None], accept_timeout: float | None = None,
            io_timeout_s: float = 60.0, on_listening: Callable[[], None] | None = None) -> Arrival:
    """Wait for one incoming migration and return the VM running here.

    Anything wrong — a refused or malformed stream, a wrong memory size, a checksum mismatch, a cut
    connection, no confirmation that the source stopped — discards everything received and raises
    MigrationError; nothing is left running.
    """
    server = listen(parse_address(listen_address))
    try:
        if on_listening is not None:
            on_listening()
        connection = Connection(accept(server, accept_timeout))
    finally:
        server.close()
    connection.sock.settimeout(io_timeout_s)
    memory: GuestMemory | None = None
    vmm: Vmm | None = None
    try:
        hello = expect(connection.receive(), MessageType.HELLO).json()
        try:
            config, memory = _accept_hello(hello)
        except PyrovisorError as exc:
            connection.send_json(MessageType.WELCOME, {"accepted": False, "reason": str(exc)})
            raise MigrationError("handshake", f"refused the incoming VM: {exc}") from None
        connection.send_json(MessageType.WELCOME, {"accepted": True})
        receiver = PageReceiver(memory, connection)
        rounds = 0
        while True:
            kind, length, sequence, checksum = connection.receive_header()
            if kind is MessageType.PAGES:
                receiver.receive(length, sequence, checksum)
                continue
            frame = connection.receive_payload(kind, length, sequence, checksum)
            if frame.type is MessageType.ROUND_END:
                excused = frame.json().get("excused", [])
                if not isinstance(excused, list) or not all(isinstance(item, int) for item in excused):
                    raise MigrationError("stream", "malformed ROUND_END message")
                receiver.settle(set(excused))
                rounds += 1
                continue
            state = expect(frame, MessageType.STATE).json()
            receiver.settle(set())
            break
        machine = _machine_from(state, config)
        digest = digest_memory(memory) if state.get("memory_sha256") else None
        if digest is not None and digest != state["memory_sha256"]:
            raise MigrationError("stop-and-copy", "memory checksum mismatch: the guest memory did not arrive intact")
        vmm = assemble_vm(machine, memory, console_output)
        memory = None  # the VM owns it now
        vmm.start()
        resumed_at = time.time()
        connection.send_json(MessageType.RESUMED, {"resumed_at": resumed_at, "memory_sha256": digest})
        connection.sock.settimeout(COMMIT_TIMEOUT_S)
        expect(connection.receive(), MessageType.STOPPED)
    except BaseException as exc:
        if vmm is not None:
            vmm.close()  # the source did not confirm it stopped: it runs the guest, this copy must go
        if memory is not None:
            memory.close()
        if isinstance(exc, PyrovisorError):
            with contextlib.suppress(PyrovisorError):
                connection.send_json(MessageType.ERROR, {"reason": f"destination: {exc}"})
        raise
    finally:
        connection.close()
    paused_at = state.get("paused_at")
    downtime = resumed_at - paused_at if isinstance(paused_at, int | float) else 0.0
    return Arrival(vmm=vmm, source=str(hello.get("source", "?")), rounds=rounds, pages_received=receiver.pages,
                   bytes_received=connection.bytes_received, downtime_s=downtime)


def _accept_hello(hello: dict[str, Any]) -> tuple[MachineConfig, GuestMemory]:
    if hello.get("protocol") != "pyrovisor-migration":
        raise MigrationError("handshake", "not a pyrovisor migration")
    if hello.get("version") != PROTOCOL_VERSION:
        raise MigrationError("handshake", f"protocol version {hello.get('version')} is not supported (this "
                             f"pyrovisor speaks {PROTOCOL_VERSION})")
    if hello.get("page_size") != PAGE_SIZE:
        raise MigrationError("handshake", f"page size {hello.get('page_size')} differs from {PAGE_SIZE}")
    config = decode(MachineConfig, hello.get("config"), "HELLO.config")
    config.validate()
    announced = hello.get("ram")
    expected = [[r.gpa, r.size] for r in ram_ranges(config.memory_size)]
    if announced != expected:
        raise MigrationError("handshake", f"memory layout {announced} does not match {config.memory_size >> 20} MiB "
                             "of RAM")
    return config, GuestMemory([MemoryRegion.anonymous(gpa, size, huge_pages=config.huge_pages)
                                for gpa, size in expected])


def _machine_from(state: dict[str, Any], config: MachineConfig) -> MachineState:
    machine = decode(MachineState, state.get("machine"), "STATE.machine")
    if machine.config != config:
        raise MigrationError("stop-and-copy", "the machine state does not match the announced configuration")
    check_machine_state(machine, "STATE")
    return machine
