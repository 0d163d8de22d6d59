"""The crypto-agile event log: writing, parsing (round trip, hostile input), replay, measure_boot, tpm2_eventlog."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrovisor.errors import AttestationError, ConfigError
from pyrovisor.tpm.event_log import (
    EV_IPL,
    EV_NO_ACTION,
    EV_SEPARATOR,
    MEASUREMENT_PCRS,
    QUOTE_PCRS,
    Event,
    EventLog,
    measure_boot,
    parse_event_log,
    replay,
    spec_id_event,
)

KERNEL, INITRD, CMDLINE = b"kernel bytes" * 10, b"initrd bytes" * 10, b"console=ttyS0 quiet"


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def booted_log(initrd: bytes | None = INITRD) -> tuple[EventLog, list[tuple[int, bytes]]]:
    log = EventLog()
    extended: list[tuple[int, bytes]] = []
    measure_boot(log, lambda pcr, digest: extended.append((pcr, digest)), KERNEL, "os.elf", initrd, "os.initrd",
                 CMDLINE)
    return log, extended


def test_conventions() -> None:
    assert MEASUREMENT_PCRS == {"kernel": 9, "initrd": 9, "cmdline": 8}
    assert QUOTE_PCRS == (8, 9)


def test_measure_boot_logs_and_extends_in_order() -> None:
    log, extended = booted_log()
    assert extended == [(9, sha256(KERNEL)), (9, sha256(INITRD)), (8, sha256(CMDLINE))]
    assert [(event.pcr, event.event_type, event.data) for event in log.events] == [
        (9, EV_IPL, b"kernel os.elf\x00"), (9, EV_IPL, b"initrd os.initrd\x00"),
        (8, EV_IPL, b"cmdline console=ttyS0 quiet\x00")]
    assert [event.measurement for event in log.events] == [
        ("kernel", "os.elf"), ("initrd", "os.initrd"), ("cmdline", "console=ttyS0 quiet")]


def test_measure_boot_without_initrd() -> None:
    log, extended = booted_log(initrd=None)
    assert [event.measurement[0] for event in log.events if event.measurement] == ["kernel", "cmdline"]
    assert len(extended) == 2


def test_a_nul_in_the_command_line_is_refused() -> None:
    with pytest.raises(ConfigError, match="NUL"):
        measure_boot(EventLog(), lambda pcr, digest: None, KERNEL, "os.elf", None, "", b"a\x00b")


def test_round_trip_and_replay() -> None:
    log, _ = booted_log()
    data = log.to_bytes()
    assert data.startswith(spec_id_event())
    events = parse_event_log(data)
    assert events == list(log.events)
    values = replay(events, [8, 9, 16])
    assert values[8] == sha256(bytes(32) + sha256(CMDLINE))
    assert values[9] == sha256(sha256(bytes(32) + sha256(KERNEL)) + sha256(INITRD))
    assert values[16] == bytes(32)


def test_replay_skips_no_action_events() -> None:
    events = [Event(8, EV_NO_ACTION, sha256(b"x"), b""), Event(8, EV_SEPARATOR, sha256(b"y"), b"")]
    assert replay(events, [8]) == {8: sha256(bytes(32) + sha256(b"y"))}


def test_an_empty_log_has_only_the_header() -> None:
    assert parse_event_log(EventLog().to_bytes()) == []


def test_every_truncation_names_its_offset() -> None:
    data = booted_log()[0].to_bytes()
    boundaries = {len(spec_id_event())}
    offset = len(spec_id_event())
    for event in parse_event_log(data):
        offset += 4 + 4 + 4 + 2 + 32 + 4 + len(event.data)
        boundaries.add(offset)
    for cut in range(len(data)):
        if cut in boundaries:
            continue  # a log cut between events is a shorter, valid log
        with pytest.raises(AttestationError, match=r"(truncated|malformed) at offset \d+|empty"):
            parse_event_log(data[:cut])


def test_malformed_logs() -> None:
    header = spec_id_event()
    with pytest.raises(AttestationError, match="not the Spec ID event"):
        parse_event_log(struct.pack("<II", 0, EV_IPL) + header[8:])
    with pytest.raises(AttestationError, match="signature"):
        parse_event_log(header.replace(b"Spec ID Event03", b"Spec ID Event02"))
    event = struct.pack("<IIIH", 8, EV_IPL, 1, 0x0004) + bytes(20) + struct.pack("<I", 0)
    with pytest.raises(AttestationError, match=f"offset {len(header) + 12}: digest algorithm 0x0004"):
        parse_event_log(header + event)
    no_digest = struct.pack("<III", 8, EV_IPL, 0) + struct.pack("<I", 0)
    with pytest.raises(AttestationError, match=f"malformed at offset {len(header)}: .*no SHA-256 digest"):
        parse_event_log(header + no_digest)
    bad_pcr = struct.pack("<IIIH", 99, EV_IPL, 1, 0x000B) + bytes(32) + struct.pack("<I", 0)
    with pytest.raises(AttestationError, match="PCR 99"):
        parse_event_log(header + bad_pcr)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda tail: spec_id_event() + tail),
                 st.lists(st.tuples(st.integers(0, 30), st.integers(0, 2**32 - 1), st.integers(0, 3),
                                    st.sampled_from([0x000B, 0x0004, 0x1234]), st.binary(max_size=40),
                                    st.integers(0, 2**32 - 1), st.binary(max_size=20)), max_size=4)
                 .map(lambda events: spec_id_event() + b"".join(
                     struct.pack("<IIIH", pcr, kind, count, algorithm) + digest + struct.pack("<I", size) + data
                     for pcr, kind, count, algorithm, digest, size, data in events))))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        replay(parse_event_log(data), QUOTE_PCRS)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_logs(data: st.DataObject) -> None:
    log = bytearray(booted_log()[0].to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(log) - 1))
        log[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(log)))
    try:
        events = parse_event_log(bytes(log[:cut]))
    except AttestationError:
        return
    replay(events, QUOTE_PCRS)
    for event in events:
        _ = event.measurement, event.type_name, event.to_json()


@pytest.mark.skipif(shutil.which("tpm2_eventlog") is None, reason="tpm2_eventlog is not installed (tpm2-tools)")
def test_tpm2_eventlog_reads_the_same_log(tmp_path: Path) -> None:
    log, _ = booted_log()
    path = tmp_path / "boot.log"
    path.write_bytes(log.to_bytes())
    result = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr  # it checks PCR 8 EV_IPL digests against their text
    document = yaml.safe_load(result.stdout)
    events = document["events"]
    assert events[0]["EventType"] == "EV_NO_ACTION" and events[0]["SpecID"][0]["Signature"] == "Spec ID Event03"
    theirs = [(entry["PCRIndex"], entry["EventType"], entry["Digests"][0]["Digest"]) for entry in events[1:]]
    ours = [(event.pcr, "EV_IPL", event.digest.hex()) for event in log.events]
    assert theirs == ours
    replayed = replay(log.events, QUOTE_PCRS)
    their_pcrs = {int(pcr): f"{value:064x}" if isinstance(value, int) else value.removeprefix("0x")
                  for pcr, value in document["pcrs"]["sha256"].items()}
    assert their_pcrs == {pcr: value.hex() for pcr, value in replayed.items()}


@pytest.mark.skipif(shutil.which("tpm2_eventlog") is None, reason="tpm2_eventlog is not installed (tpm2-tools)")
def test_tpm2_eventlog_notices_a_command_line_that_does_not_match(tmp_path: Path) -> None:
    log = EventLog()
    log.measure(8, EV_IPL, b"cmdline console=ttyS0\x00", b"console=hvc0")
    path = tmp_path / "lie.log"
    path.write_bytes(log.to_bytes())
    result = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, timeout=30)
    assert "does not match" in result.stderr
