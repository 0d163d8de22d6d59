"""The TCG PC Client crypto-agile event log (SHA-256 bank), measured boot as GRUB does it, and replay.

The log's layout (TCG PC Client Platform Firmware Profile, §10; every integer little-endian): one event in
the SHA-1 format (TCG_PCR_EVENT: PCR, type, 20-byte digest, data size, data) with type EV_NO_ACTION, PCR 0,
a zero digest and the "Spec ID Event03" structure as data (TCG_EfiSpecIdEvent: it lists the digest
algorithms and their sizes), then TCG_PCR_EVENT2 entries: PCR, type, TPML_DIGEST_VALUES (a count, then for
each algorithm its 2-byte id and its digest), data size, data.

Measured boot (the VMM acts as the firmware and measures what it boots the way GRUB does): every event is
EV_IPL and its data is the ASCII string "<what> <which>" with a terminating NUL, as GRUB writes its events:

    PCR 9   "kernel <file name>\0"    SHA-256 of the kernel image's bytes
    PCR 9   "initrd <file name>\0"    SHA-256 of the initial archive's bytes (no event without one)
    PCR 8   "cmdline <the text>\0"    SHA-256 of the command line exactly as the guest receives it (no NUL)

in that order. `Event.measurement` splits the data back into ("kernel", "os.elf"). tpm2_eventlog checks a PCR 8
EV_IPL event's digest against the text after the first space (GRUB's "kernel_cmdline: ..." convention).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pyrovisor.errors import AttestationError, ConfigError

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_IPL = 0x0000000D
EVENT_TYPE_NAMES = {
    0x0: "EV_PREBOOT_CERT", 0x1: "EV_POST_CODE", 0x3: "EV_NO_ACTION", 0x4: "EV_SEPARATOR", 0x5: "EV_ACTION",
    0x6: "EV_EVENT_TAG", 0x7: "EV_S_CRTM_CONTENTS", 0x8: "EV_S_CRTM_VERSION", 0x9: "EV_CPU_MICROCODE",
    0xA: "EV_PLATFORM_CONFIG_FLAGS", 0xB: "EV_TABLE_OF_DEVICES", 0xC: "EV_COMPACT_HASH", 0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA", 0xF: "EV_NONHOST_CODE", 0x10: "EV_NONHOST_CONFIG", 0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
}

TPM_ALG_SHA1 = 0x0004
TPM_ALG_SHA256 = 0x000B
SHA1_SIZE = 20
SHA256_SIZE = 32
PCR_COUNT = 24

MEASUREMENT_PCRS = {"kernel": 9, "initrd": 9, "cmdline": 8}  # GRUB's: files in 9, command lines in 8
QUOTE_PCRS = (8, 9)  # the PCRs a quote covers by default: everything measure_boot extends

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
SPEC_PLATFORM_CLASS_CLIENT = 0
SPEC_VERSION = (0, 2, 0)  # minor, major, errata: the crypto-agile format of the 2.0 profile
SPEC_UINTN_SIZE_64 = 2  # UINTN is 8 bytes on x86-64

_HEADER = struct.Struct("<II")  # PCR index, event type
_SIZE = struct.Struct("<I")
_ALGORITHM = struct.Struct("<HH")  # algorithm id, digest size
_SPEC_ID_FIXED = struct.Struct("<16sIBBBBI")  # signature, class, minor, major, errata, uintn size, count

MAX_ALGORITHMS = 16  # more than any TPM has banks; a larger count is a malformed log


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2: what was measured into which PCR (SHA-256 digest only)."""

    pcr: int
    event_type: int
    digest: bytes
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_TYPE_NAMES.get(self.event_type, f"{self.event_type:#x}")

    @property
    def measurement(self) -> tuple[str, str] | None:
        """("kernel", "os.elf") for measure_boot's events; None for any other event."""
        if self.event_type != EV_IPL:
            return None
        what, space, which = self.data.removesuffix(b"\x00").partition(b" ")
        name = what.decode("ascii", errors="replace")
        if name not in MEASUREMENT_PCRS or not space:
            return None
        return name, which.decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, object]:
        return {"pcr": self.pcr, "type": self.type_name, "sha256": self.digest.hex(),
                "data": self.data.decode("utf-8", errors="replace")}


class EventLog:
    """An event log being written: the Spec ID header, then the events in the order they were measured."""

    def __init__(self) -> None:
        self._events: list[Event] = []

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    def measure(self, pcr: int, event_type: int, data: bytes, measured: bytes) -> Event:
        """Record that SHA-256(`measured`) goes into `pcr`, described by `data`; the caller extends the PCR."""
        if not 0 <= pcr < PCR_COUNT:
            raise AttestationError("event log", f"PCR {pcr} is not 0 to {PCR_COUNT - 1}")
        event = Event(pcr, event_type, hashlib.sha256(measured).digest(), bytes(data))
        self._events.append(event)
        return event

    def to_bytes(self) -> bytes:
        return spec_id_event() + b"".join(_event2(event) for event in self._events)


def spec_id_event() -> bytes:
    """The log's first event: the SHA-1-format EV_NO_ACTION carrying TCG_EfiSpecIdEvent (SHA-256 only)."""
    minor, major, errata = SPEC_VERSION
    spec = (_SPEC_ID_FIXED.pack(SPEC_ID_SIGNATURE, SPEC_PLATFORM_CLASS_CLIENT, minor, major, errata,
                                SPEC_UINTN_SIZE_64, 1)
            + _ALGORITHM.pack(TPM_ALG_SHA256, SHA256_SIZE)
            + b"\x00")  # vendorInfoSize
    return _HEADER.pack(0, EV_NO_ACTION) + bytes(SHA1_SIZE) + _SIZE.pack(len(spec)) + spec


def _event2(event: Event) -> bytes:
    return (_HEADER.pack(event.pcr, event.event_type) + _SIZE.pack(1) + struct.pack("<H", TPM_ALG_SHA256)
            + event.digest + _SIZE.pack(len(event.data)) + event.data)


class _Reader:
    """Bounds-checked little-endian reads; running out names the offset."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.offset:
            raise AttestationError("event log", f"truncated at offset {self.offset}: {what} needs {size} bytes, "
                                                f"{len(self.data) - self.offset} left")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, layout: struct.Struct, what: str) -> tuple[Any, ...]:
        values: tuple[Any, ...] = layout.unpack(self.take(layout.size, what))
        return values

    def fail(self, at: int, reason: str) -> AttestationError:
        return AttestationError("event log", f"malformed at offset {at}: {reason}")


def parse_event_log(data: bytes) -> list[Event]:
    """The TCG_PCR_EVENT2 entries of a crypto-agile log (the Spec ID header checked and left out). The log must
    have a SHA-256 bank; each event's SHA-256 digest is kept. Malformed input raises AttestationError."""
    reader = _Reader(bytes(data))
    if not data:
        raise AttestationError("event log", "empty (no Spec ID header)")
    sizes = _parse_spec_id(reader)
    events: list[Event] = []
    while reader.offset < len(reader.data):
        start = reader.offset
        pcr, event_type = reader.unpack(_HEADER, "an event header")
        if pcr >= PCR_COUNT and event_type != EV_NO_ACTION:
            raise reader.fail(start, f"PCR {pcr} is not 0 to {PCR_COUNT - 1}")
        (count,) = reader.unpack(_SIZE, "a digest count")
        if count > len(sizes):
            raise reader.fail(start, f"{count} digests, but the header lists {len(sizes)} algorithms")
        digest = None
        for _ in range(count):
            at = reader.offset
            (algorithm,) = struct.unpack("<H", reader.take(2, "a digest's algorithm"))
            size = sizes.get(algorithm)
            if size is None:
                raise reader.fail(at, f"digest algorithm {algorithm:#06x} is not in the header")
            value = reader.take(size, f"a {size}-byte digest")
            if algorithm == TPM_ALG_SHA256:
                digest = value
        if digest is None:
            raise reader.fail(start, "the event has no SHA-256 digest")
        (size,) = reader.unpack(_SIZE, "an event's data size")
        events.append(Event(pcr, event_type, digest, reader.take(size, f"{size} bytes of event data")))
    return events


def _parse_spec_id(reader: _Reader) -> dict[int, int]:
    """Check the SHA-1-format first event and return its algorithm table {algorithm id: digest size}."""
    pcr, event_type = reader.unpack(_HEADER, "the first event's header")
    if event_type != EV_NO_ACTION or pcr != 0:
        raise reader.fail(0, f"the first event is {EVENT_TYPE_NAMES.get(event_type, hex(event_type))} on PCR "
                             f"{pcr}, not the Spec ID event (EV_NO_ACTION on PCR 0): not a crypto-agile log")
    reader.take(SHA1_SIZE, "the first event's SHA-1 digest")
    (size,) = reader.unpack(_SIZE, "the Spec ID event's size")
    body_start = reader.offset
    body = _Reader(reader.take(size, "the Spec ID event"))
    signature, _, _, major, _, _, count = body.unpack(_SPEC_ID_FIXED, "the Spec ID event's fixed part")
    if signature != SPEC_ID_SIGNATURE:
        raise reader.fail(body_start, f"the first event's signature is {signature!r}, not 'Spec ID Event03'")
    if major != 2:
        raise reader.fail(body_start, f"the Spec ID event has version {major}, not 2")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise reader.fail(body_start, f"the Spec ID event lists {count} algorithms")
    sizes: dict[int, int] = {}
    for _ in range(count):
        algorithm, digest_size = body.unpack(_ALGORITHM, "an algorithm of the Spec ID event")
        if algorithm in sizes or digest_size == 0 or digest_size > 64:
            raise reader.fail(body_start, f"the Spec ID event lists algorithm {algorithm:#06x} with "
                                          f"{digest_size}-byte digests")
        sizes[algorithm] = digest_size
    if sizes.get(TPM_ALG_SHA256) != SHA256_SIZE:
        raise reader.fail(body_start, "the log has no SHA-256 bank of 32-byte digests")
    (vendor_size,) = body.unpack(struct.Struct("<B"), "the vendor info size")
    body.take(vendor_size, "the vendor info")
    return sizes


def replay(events: Iterable[Event], pcrs: Sequence[int]) -> dict[int, bytes]:
    """The SHA-256 values `pcrs` have after extending, from 32 zero bytes, each event of theirs in order
    (EV_NO_ACTION events are not extended)."""
    values = {pcr: bytes(SHA256_SIZE) for pcr in pcrs}
    for event in events:
        if event.pcr in values and event.event_type != EV_NO_ACTION:
            values[event.pcr] = hashlib.sha256(values[event.pcr] + event.digest).digest()
    return values


def measure_boot(log: EventLog, extend: Callable[[int, bytes], None], kernel: bytes, kernel_name: str,
                 initrd: bytes | None, initrd_name: str, cmdline: bytes) -> None:
    """Measure a boot: the kernel and the initrd into PCR 9, the command line into PCR 8 (see the module's
    docstring), each event logged and its digest extended with `extend(pcr, digest)` in that order."""
    for what, text in (("kernel name", kernel_name.encode()), ("initrd name", initrd_name.encode()),
                       ("command line", cmdline)):
        if b"\x00" in text:
            raise ConfigError(what, text.decode(errors="replace"), "contains a NUL byte")
    steps: list[tuple[str, bytes, bytes]] = [("kernel", kernel_name.encode(), kernel)]
    if initrd is not None:
        steps.append(("initrd", initrd_name.encode(), initrd))
    steps.append(("cmdline", cmdline, cmdline))
    for name, which, measured in steps:
        event = log.measure(MEASUREMENT_PCRS[name], EV_IPL, name.encode() + b" " + which + b"\x00", measured)
        extend(event.pcr, event.digest)
