"""Hostile snapshot files, without KVM: special files, bounded parsing, memory-range checks, modes, fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_snapshot_format import sample_state

from deadlines import deadline
from pyrovisor.arch.x86_64.layout import RamRange
from pyrovisor.errors import StateError
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.snapshot import memory_file
from pyrovisor.snapshot.chain import load_chain
from pyrovisor.snapshot.file_format import (
    FORMAT_VERSION,
    HEADER,
    MAX_PAYLOAD,
    dump_state,
    load_state,
    read_state_file,
    write_state_file,
)
from pyrovisor.snapshot.memory_file import (
    apply_diff_image,
    check_memory_image,
    file_sha256,
    open_full_image,
    write_diff_image,
    write_full_image,
)
from pyrovisor.snapshot.state import DIFF, FULL, BaseReference, MemoryImage, MemoryRange, SnapshotState

PAGE = 4096
# A small machine for the memory-file tests: two RAM ranges with a hole between them.
RAM = (RamRange(0, 16 * PAGE), RamRange(1 << 20, 8 * PAGE))


def rewrap(payload: bytes, version: int = FORMAT_VERSION, flags: int = 0, length: int | None = None) -> bytes:
    """A state file around `payload` with a correct checksum, so damage reaches the JSON and decoder layers."""
    header = HEADER.pack(b"PYRVSNAP", version, flags, 0, len(payload) if length is None else length, 0)
    return header + payload + hashlib.sha256(header + payload).digest()


def payload_of(state: SnapshotState) -> bytes:
    return dump_state(state)[HEADER.size:-32]


# --- special files in place of a snapshot's files ---------------------------------------------------

def make_symlink_loop(path: Path) -> None:
    os.symlink(path.name + ".other", path)
    os.symlink(path.name, path.with_name(path.name + ".other"))


def make_directory(path: Path) -> None:
    path.mkdir()


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_dev_zero_link(path: Path) -> None:
    os.symlink("/dev/zero", path)


HOSTILE_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "symlink loop": (make_symlink_loop, "symlink loop"),
    "directory": (make_directory, "is a directory, not a regular file"),
    "fifo": (make_fifo, "is a FIFO, not a regular file"),
    "/dev/zero": (make_dev_zero_link, "is a character device, not a regular file"),
}


def replace_with(path: Path, hostile: str) -> str:
    """Put the hostile thing at `path`; return the message its refusal must contain."""
    if path.exists() or path.is_symlink():
        path.unlink()
    make, message = HOSTILE_FILES[hostile]
    make(path)
    return message


def refused(call: Callable[[], object], message: str, path: Path) -> StateError:
    """`call` fails at once with a one-line StateError naming `path` and containing `message`."""
    with deadline(5), pytest.raises(StateError, match=message) as caught:
        call()
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    return caught.value


def full_snapshot(directory: Path) -> Path:
    """A snapshot directory holding the sample state and a full memory image of the size it says."""
    directory.mkdir()
    state = sample_state()
    with open(directory / "memory.img", "wb") as handle:
        handle.truncate(state.memory.file_size)
    write_state_file(directory / "state", state)
    return directory


@pytest.mark.parametrize("hostile", HOSTILE_FILES)
def test_state_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, hostile: str) -> None:
    snapshot = full_snapshot(tmp_path / "snap")
    message = replace_with(snapshot / "state", hostile)
    refused(lambda: read_state_file(snapshot / "state"), message, snapshot / "state")
    refused(lambda: load_chain(snapshot), message, snapshot / "state")


UNREADABLE_CHECK = """
import sys
from pathlib import Path
from pyrovisor.arch.x86_64.layout import RamRange
from pyrovisor.errors import StateError
from pyrovisor.snapshot.file_format import read_state_file
from pyrovisor.snapshot.memory_file import open_full_image
from pyrovisor.snapshot.state import FULL, MemoryImage, MemoryRange
state, memory = Path(sys.argv[1]), Path(sys.argv[2])
image = MemoryImage(FULL, memory.name, 4096, "", (MemoryRange(0, 4096, 0),))
for load in (lambda: read_state_file(state),
             lambda: open_full_image(memory.parent, image, [RamRange(0, 4096)], lazy=True, verify=False),
             lambda: open_full_image(memory.parent, image, [RamRange(0, 4096)], lazy=False, verify=True)):
    try:
        load()
    except StateError as exc:
        print(exc)
"""


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    """EACCES is a StateError. Root reads any file, so as root the check runs without the capabilities
    that allow that (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    snapshot = full_snapshot(tmp_path / "snap")
    memory = tmp_path / "memory.img"
    memory.write_bytes(bytes(PAGE))
    for path in (snapshot / "state", memory):
        os.chmod(path, 0)
    command = [sys.executable, "-c", UNREADABLE_CHECK, str(snapshot / "state"), str(memory)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, and setpriv (to drop root's file access) is not installed")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert result.stdout.splitlines() == [f"{snapshot / 'state'}: cannot open the state file: Permission denied",
                                          *[f"{memory}: cannot open the memory file: Permission denied"] * 2]


def test_snapshot_directory_that_is_a_loop_or_not_a_directory_is_refused(tmp_path: Path) -> None:
    make_symlink_loop(tmp_path / "loop")
    refused(lambda: load_chain(tmp_path / "loop"), "symlink loop", tmp_path / "loop")
    os.mkfifo(tmp_path / "fifo")
    refused(lambda: load_chain(tmp_path / "fifo"), "is a FIFO, not a snapshot directory", tmp_path / "fifo")


def test_base_directory_with_a_nul_is_refused(tmp_path: Path) -> None:
    snapshot = tmp_path / "diff"
    snapshot.mkdir()
    (snapshot / "memory.diff").touch()
    state = dataclasses.replace(sample_state(), memory=MemoryImage(DIFF, "memory.diff", 0, "", ()),
                                base=BaseReference("../base\0", "abc"))
    write_state_file(snapshot / "state", state)
    refused(lambda: load_chain(snapshot), "is not a path", snapshot / "state")


def guest_memory() -> GuestMemory:
    """Small anonymous guest memory over RAM, with a recognisable byte in each page."""
    memory = GuestMemory(MemoryRegion.anonymous(r.gpa, r.size, huge_pages=False) for r in RAM)
    for ram in RAM:
        for gpa in range(ram.gpa, ram.end, PAGE):
            memory.write_u8(gpa, (gpa // PAGE) % 251 + 1)
    return memory


def memory_snapshot(directory: Path, kind: str) -> MemoryImage:
    """A real memory file (full: all of RAM; diff: pages 1-2 and the first page of the second range)."""
    directory.mkdir(exist_ok=True)
    with contextlib.closing(guest_memory()) as memory:
        if kind == FULL:
            image = write_full_image(memory, directory / "memory.img")
        else:
            image = write_diff_image(memory, [1, 2, (1 << 20) // PAGE], directory / "memory.diff")
    return dataclasses.replace(image, sha256=file_sha256(directory / image.file))


def restore_memory(directory: Path, image: MemoryImage, lazy: bool = True, verify: bool = False) -> None:
    """Open the image the way a restore does and release everything again."""
    if image.kind == FULL:
        open_full_image(directory, image, RAM, lazy=lazy, verify=verify).close()
        return
    with contextlib.closing(guest_memory()) as memory:
        apply_diff_image(directory, image, memory, verify=verify)


MEMORY_MODES = {"lazy": {"lazy": True}, "eager": {"lazy": False}, "verify": {"lazy": True, "verify": True}}


@pytest.mark.parametrize("mode", MEMORY_MODES)
@pytest.mark.parametrize("kind", [FULL, DIFF])
@pytest.mark.parametrize("hostile", HOSTILE_FILES)
def test_memory_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, hostile: str, kind: str,
                                                           mode: str) -> None:
    image = memory_snapshot(tmp_path, kind)
    path = tmp_path / image.file
    message = replace_with(path, hostile)
    options = MEMORY_MODES[mode]
    refused(lambda: restore_memory(tmp_path, image, **options), message, path)
    refused(lambda: file_sha256(path), message, path)


@pytest.mark.parametrize("hostile", HOSTILE_FILES)
def test_empty_diff_whose_file_is_special_is_refused_without_blocking(tmp_path: Path, hostile: str) -> None:
    """An empty diff expects a 0-byte file, which is what a FIFO or /dev/zero reports."""
    tmp_path.joinpath("memory.diff").touch()
    message = replace_with(tmp_path / "memory.diff", hostile)
    image = MemoryImage(DIFF, "memory.diff", 0, hashlib.sha256(b"").hexdigest(), ())
    for verify in (False, True):
        refused(lambda verify=verify: restore_memory(tmp_path, image, verify=verify), message,
                tmp_path / "memory.diff")


def test_regular_files_through_a_symlink_still_restore(tmp_path: Path) -> None:
    for kind in (FULL, DIFF):
        image = memory_snapshot(tmp_path / kind, kind)
        (tmp_path / kind / image.file).rename(tmp_path / f"elsewhere-{kind}")
        os.symlink(tmp_path / f"elsewhere-{kind}", tmp_path / kind / image.file)
        for options in MEMORY_MODES.values():
            restore_memory(tmp_path / kind, image, **options)


def test_restored_memory_holds_the_saved_bytes(tmp_path: Path) -> None:
    full = memory_snapshot(tmp_path / "full", FULL)
    diff = memory_snapshot(tmp_path / "diff", DIFF)
    with contextlib.closing(guest_memory()) as expected:
        for lazy in (True, False):
            with contextlib.closing(open_full_image(tmp_path / "full", full, RAM, lazy=lazy, verify=True)) as memory:
                for ram in RAM:
                    assert memory.read(ram.gpa, ram.size) == expected.read(ram.gpa, ram.size)
        with contextlib.closing(GuestMemory(MemoryRegion.anonymous(r.gpa, r.size, huge_pages=False)
                                            for r in RAM)) as memory:
            apply_diff_image(tmp_path / "diff", diff, memory, verify=True)
            assert memory.read(PAGE, 2 * PAGE) == expected.read(PAGE, 2 * PAGE)
            assert memory.read(1 << 20, PAGE) == expected.read(1 << 20, PAGE)
            assert memory.read(3 * PAGE, PAGE) == bytes(PAGE)


def test_read_errors_are_state_errors_and_leave_memory_closable(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error mid-restore is a StateError, and no view of guest memory outlives it (which would
    keep the memory from being unmapped, turning the StateError into another error)."""
    full = memory_snapshot(tmp_path / "full", FULL)
    diff = memory_snapshot(tmp_path / "diff", DIFF)

    def failing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with pytest.raises(StateError, match=r"memory\.img: cannot read the file: Input/output error"):
        open_full_image(tmp_path / "full", full, RAM, lazy=False, verify=False)
    memory = guest_memory()
    with pytest.raises(StateError, match=r"memory\.diff: cannot read the file: Input/output error"):
        apply_diff_image(tmp_path / "diff", diff, memory, verify=False)
    memory.close()


# --- the JSON payload ----------------------------------------------------------------------------

def test_deeply_nested_payload_is_refused(tmp_path: Path) -> None:
    depth = 100_000
    payload = b'{"kind":"pyrovisor-machine-state","state":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(StateError, match="nested too deeply"):
        load_state(rewrap(payload), "test")
    snapshot = full_snapshot(tmp_path / "snap")
    (snapshot / "state").write_bytes(rewrap(payload))
    refused(lambda: load_chain(snapshot), "nested too deeply", snapshot / "state")


def test_huge_integer_in_payload_is_refused() -> None:
    payload = payload_of(sample_state())
    for digits in (b"7" * 5000, b"-" + b"7" * 5000):
        huge, count = re.subn(rb'(?<=":)-?[0-9]+(?=[,}])', digits, payload, count=1)  # the first integer field
        assert count == 1
        with pytest.raises(StateError, match=r"an integer of 500[01] digits"):
            load_state(rewrap(huge), "test")


def test_non_finite_and_non_utf8_payloads_are_refused() -> None:
    with pytest.raises(StateError, match="NaN is not a JSON number"):
        load_state(rewrap(b'{"kind":"pyrovisor-machine-state","state":NaN}'), "test")
    with pytest.raises(StateError, match="UTF-8"):
        load_state(rewrap(b'{"kind":"\xff"}'), "test")


def test_unpaired_surrogate_in_a_string_is_refused(tmp_path: Path) -> None:
    """json.loads accepts "\\ud800"; the string cannot be encoded, which used to escape as UnicodeEncodeError."""
    state = sample_state()
    text = dataclasses.replace(state, machine=dataclasses.replace(
        state.machine, config=dataclasses.replace(state.machine.config, cmdline="ticks=3 \U0001f600")))
    assert load_state(dump_state(text), "test") == text  # a proper pair (non-BMP text) is fine
    payload = payload_of(state).replace(b'"ticks=3"', b'"ticks=3\\ud800"')
    with pytest.raises(StateError, match="unpaired UTF-16 surrogate"):
        load_state(rewrap(payload), "test")
    snapshot = full_snapshot(tmp_path / "snap")
    (snapshot / "state").write_bytes(rewrap(payload))
    refused(lambda: load_chain(snapshot), "unpaired UTF-16 surrogate", snapshot / "state")


def test_state_file_read_is_bounded_by_the_cap(tmp_path: Path) -> None:
    with open(tmp_path / "state", "wb") as handle:
        handle.truncate(HEADER.size + MAX_PAYLOAD + 32 + 1)
    refused(lambda: read_state_file(tmp_path / "state"), "larger than any valid state file", tmp_path / "state")


# --- memory-range fields -------------------------------------------------------------------------

def _diff(*ranges: tuple[int, int, int], **fields: Any) -> MemoryImage:
    end = max((offset + size for _, size, offset in ranges), default=0)
    image = MemoryImage(DIFF, "memory.diff", end, "", tuple(MemoryRange(*r) for r in ranges))
    return dataclasses.replace(image, **fields)


def _full(*ranges: tuple[int, int, int], **fields: Any) -> MemoryImage:
    image = _diff(*ranges, kind=FULL, file="memory.img")
    return dataclasses.replace(image, **fields)


GOOD_FULL = ((0, 16 * PAGE, 0), (1 << 20, 8 * PAGE, 16 * PAGE))
BAD_IMAGES: dict[str, tuple[MemoryImage, str]] = {
    "unaligned file offset": (_diff((0, PAGE, 100)), r"memory range 0: file_offset 0x64 is not a page-aligned"),
    "negative file offset": (_diff((0, PAGE, PAGE), (PAGE, PAGE, -PAGE)),
                             r"memory range 1: file_offset -0x1000 is not a page-aligned"),
    "unaligned gpa": (_diff((PAGE + 8, PAGE, 0)), r"memory range 0: gpa 0x1008 is not a page-aligned"),
    "negative gpa": (_diff((-PAGE, PAGE, 0)), r"memory range 0: gpa -0x1000 is not a page-aligned"),
    "unaligned size": (_diff((0, PAGE + 1, 0)), r"memory range 0: size 0x1001 is not a positive multiple"),
    "zero size": (_diff((0, PAGE, 0), (2 * PAGE, 0, PAGE)), r"memory range 1: size 0x0 is not a positive"),
    "negative size": (_diff((0, -PAGE, 0)), r"memory range 0: size -0x1000 is not a positive"),
    "overlap in the file": (_diff((0, 2 * PAGE, 0), (4 * PAGE, PAGE, PAGE)),
                            "memory ranges 0 and 1 overlap in the memory file"),
    "overlap in guest memory": (_diff((2 * PAGE, PAGE, PAGE), (0, 4 * PAGE, 2 * PAGE)),
                                "memory ranges 1 and 0 overlap in guest memory"),
    "outside RAM": (_diff((16 * PAGE, PAGE, 0)), "diff range at 0x10000 .* lies outside guest RAM"),
    "across the RAM hole": (_diff((15 * PAGE, (1 << 20) - 15 * PAGE + PAGE, 0)), "lies outside guest RAM"),
    "file_size too large": (_diff((0, PAGE, 0), file_size=2 * PAGE), "file_size 8192 disagrees with the ranges"),
    "file_size too small": (_diff((0, 2 * PAGE, 0), file_size=PAGE), "file_size 4096 disagrees with the ranges"),
    "wrong kind": (_diff((0, PAGE, 0), kind="sparse"), "expected a diff memory image, found 'sparse'"),
    "full: overlap in the file": (_full((0, 16 * PAGE, 0), (1 << 20, 8 * PAGE, 8 * PAGE)),
                                  "memory ranges 0 and 1 overlap in the memory file"),
    "full: unaligned offset": (_full((0, 16 * PAGE, 0), (1 << 20, 8 * PAGE, 16 * PAGE + 512)),
                               "memory range 1: file_offset 0x10200 is not a page-aligned"),
    "full: unaligned size": (_full((0, 16 * PAGE - 1, 0), (1 << 20, 8 * PAGE, 16 * PAGE)),
                             r"memory range 0: size 0xffff is not a positive multiple"),
    "full: not the RAM layout": (_full((0, 8 * PAGE, 0), (1 << 20, 8 * PAGE, 8 * PAGE)),
                                 "do not match the machine's RAM layout"),
    "full: file_size": (_full(*GOOD_FULL, file_size=32 * PAGE), "file_size 131072 disagrees with the ranges"),
}
for _name in ("", ".", "..", "../memory.img", "sub/memory.img", "/etc/passwd", "memory\0.img"):
    BAD_IMAGES[f"diff named {_name!r}"] = (_diff((0, PAGE, 0), file=_name), "is not a plain file name")
    BAD_IMAGES[f"full named {_name!r}"] = (_full(*GOOD_FULL, file=_name), "is not a plain file name")


def _forbid_file_access(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a file was opened or mapped before the image was checked: {args}")

    monkeypatch.setattr(memory_file, "open_snapshot_file", forbidden)
    monkeypatch.setattr(MemoryRegion, "file_private", forbidden)


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_memory_range_fields_are_refused_before_any_file_is_opened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    image, message = BAD_IMAGES[case]
    for name in ("memory.img", "memory.diff"):
        with open(tmp_path / name, "wb") as handle:
            handle.truncate(image.file_size if image.file_size > 0 else 0)
    _forbid_file_access(monkeypatch)
    if image.kind == FULL:
        for lazy in (True, False):
            refused(lambda lazy=lazy: open_full_image(tmp_path, image, RAM, lazy=lazy, verify=False),
                    message, tmp_path)
    else:
        refused(lambda: restore_memory(tmp_path, image), message, tmp_path)


SAMPLE_RAM = 64 << 20  # the sample machine's single RAM range
BAD_IMAGES_IN_STATE: dict[str, tuple[MemoryImage, str]] = {
    "diff: unaligned file offset": (_diff((0, PAGE, 100)), "file_offset 0x64 is not a page-aligned"),
    "diff: overlap in guest memory": (_diff((0, 2 * PAGE, 0), (PAGE, PAGE, 2 * PAGE)),
                                      "memory ranges 0 and 1 overlap in guest memory"),
    "diff: named '..'": (_diff((0, PAGE, 0), file=".."), "is not a plain file name"),
    "full: unaligned file offset": (_full((0, SAMPLE_RAM, 512)), "file_offset 0x200 is not a page-aligned"),
    "full: named ''": (_full((0, SAMPLE_RAM, 0), file=""), "is not a plain file name"),
    "full: file_size": (_full((0, SAMPLE_RAM, 0), file_size=SAMPLE_RAM + PAGE), "file_size .* disagrees"),
}


@pytest.mark.parametrize("case", BAD_IMAGES_IN_STATE)
def test_bad_memory_ranges_are_refused_when_the_chain_is_loaded(tmp_path: Path, case: str) -> None:
    """load_chain checks the memory description, so a restore refuses it before any memory exists."""
    image, message = BAD_IMAGES_IN_STATE[case]
    sample = sample_state()
    assert [(r.gpa, r.size) for r in sample.machine.ram] == [(0, SAMPLE_RAM)]
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    base = BaseReference("../base", "abc") if image.kind == DIFF else None
    write_state_file(snapshot / "state", dataclasses.replace(sample, memory=image, base=base))
    refused(lambda: load_chain(snapshot), message, snapshot / "state")


def test_good_images_pass_the_checks(tmp_path: Path) -> None:
    check_memory_image(_full(*GOOD_FULL), FULL, RAM, "x")
    check_memory_image(_diff((PAGE, 2 * PAGE, PAGE), (1 << 20, PAGE, 0)), DIFF, RAM, "x")
    check_memory_image(_diff(), DIFF, RAM, "x")


# --- modes of written files ----------------------------------------------------------------------

@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
def test_snapshot_files_are_written_0600_whatever_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             mask: int) -> None:
    partial_modes = []
    real_replace = os.replace

    def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        partial_modes.append(stat.S_IMODE(os.stat(source).st_mode))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with umask(mask), contextlib.closing(guest_memory()) as memory:
        write_state_file(tmp_path / "state", sample_state())
        write_full_image(memory, tmp_path / "memory.img")
        write_diff_image(memory, [0, 5], tmp_path / "memory.diff")
    assert partial_modes == [0o600]
    for name in ("state", "memory.img", "memory.diff"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name


def test_writers_never_follow_or_overwrite_what_is_there(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, tmp_path / "state.partial")
    with pytest.raises(StateError, match=r"state\.partial: cannot create"):
        write_state_file(tmp_path / "state", sample_state())
    for name in ("memory.img", "memory.diff"):
        os.symlink(victim, tmp_path / name)
    with contextlib.closing(guest_memory()) as memory:
        with pytest.raises(StateError, match=r"memory\.img: cannot create"):
            write_full_image(memory, tmp_path / "memory.img")
        with pytest.raises(StateError, match=r"memory\.diff: cannot create"):
            write_diff_image(memory, [0], tmp_path / "memory.diff")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "state").exists()


# --- fuzzing ---------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _paths(value, (*prefix, index))


def _replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[path[0]] = _replaced(document[path[0]], path[1:], value)
    return copy


def _load_state_and_chain(blob: bytes) -> None:
    """What a restore does with a state file before anything is created: only success or a StateError."""
    with deadline(30):
        with contextlib.suppress(StateError):
            load_state(blob, "fuzz")
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "state").write_bytes(blob)
            with contextlib.suppress(StateError):
                load_chain(Path(directory))


SAMPLE_DOCUMENT = json.loads(payload_of(sample_state()))
SAMPLE_PATHS = list(_paths(SAMPLE_DOCUMENT))
PLACEHOLDER = "\x00fuzzed value\x00"
# JSON text for a field: ordinary values of any type, and the hostile kinds json.dumps cannot produce.
raw_values = st.one_of(
    json_values.map(lambda value: json.dumps(value)),
    st.integers(1, 100_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 100_000).map(lambda depth: '{"a":' * depth + "0" + "}" * depth),
    st.integers(1, 6000).map(lambda digits: "9" * digits),
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", '"\\ud800"', "1" + "0" * 30 + ".5"]),
)


@FUZZ
@given(st.sampled_from(SAMPLE_PATHS), raw_values)
def test_fuzz_state_fields_replaced_and_rechecksummed(path: tuple[Any, ...], value: str) -> None:
    text = json.dumps(_replaced(SAMPLE_DOCUMENT, path, PLACEHOLDER), separators=(",", ":"))
    _load_state_and_chain(rewrap(text.replace(json.dumps(PLACEHOLDER), value).encode()))


@FUZZ
@given(st.data())
def test_fuzz_state_payload_bytes_mutated_and_rechecksummed(data: st.DataObject) -> None:
    payload = bytearray(payload_of(sample_state()))
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, len(payload)))
        end = data.draw(st.integers(start, min(len(payload), start + 16)))
        payload[start:end] = data.draw(st.binary(max_size=16) | st.sampled_from(
            [b"[" * 5000, b"9" * 400, b"1e999", b"NaN", b"-Infinity", b"\xff\xfe", b'"\\ud800"', b"{}", b"null"]))
    _load_state_and_chain(rewrap(bytes(payload)))


@FUZZ
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, (1 << 64) - 1), st.booleans())
def test_fuzz_state_header_fields_rechecksummed(version: int, flags: int, length: int, keep: bool) -> None:
    payload = payload_of(sample_state())
    _load_state_and_chain(rewrap(payload, version, flags, len(payload) if keep else length))


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 10_000))
def test_fuzz_state_random_bytes_and_truncations(noise: bytes, cut: int) -> None:
    blob = dump_state(sample_state())
    _load_state_and_chain(noise)
    _load_state_and_chain(b"PYRVSNAP" + noise)
    _load_state_and_chain(blob[:max(0, len(blob) - cut)])


page_numbers = st.integers(-2, 300).map(lambda page: page * PAGE)
awkward_ints = st.one_of(page_numbers, st.integers(-(1 << 70), 1 << 70), st.sampled_from([0, 1, PAGE - 1, 1 << 20]))
memory_ranges = st.builds(MemoryRange, gpa=awkward_ints, size=awkward_ints, file_offset=awkward_ints)
file_names = st.sampled_from(["memory.img", "memory.diff", "", ".", "..", "a/b", "x\0"]) | st.text(max_size=8)


@FUZZ
@given(kind=st.sampled_from([FULL, DIFF, "other"]), file=file_names, file_size=awkward_ints,
       ranges=st.lists(memory_ranges, max_size=5), expect=st.sampled_from([FULL, DIFF]))
def test_fuzz_memory_image_descriptions(kind: str, file: str, file_size: int, ranges: list[MemoryRange],
                                        expect: str) -> None:
    image = MemoryImage(kind, file, file_size, "", tuple(ranges))
    try:
        check_memory_image(image, expect, RAM, "fuzz")
    except StateError:
        return
    assert kind == expect and file not in ("", ".", "..") and "/" not in file and "\0" not in file
    for r in ranges:  # what passes can be mapped and read safely
        assert r.gpa % PAGE == 0 and r.file_offset % PAGE == 0 and r.size > 0 and r.size % PAGE == 0
        assert any(ram.gpa <= r.gpa and r.gpa + r.size <= ram.end for ram in RAM)
        assert r.file_offset >= 0 and r.file_offset + r.size <= file_size


def _consistent_image(data: st.DataObject, kind: str) -> MemoryImage:
    """A description that passes the checks (so the file's content and size are what the fuzz varies)."""
    if kind == FULL:
        return _full(*GOOD_FULL)
    pages = data.draw(st.lists(st.sampled_from([*range(16), *range(256, 264)]), unique=True, max_size=6))
    runs = memory_file.page_runs(pages)
    ranges, offset = [], 0
    for first, count in runs:
        ranges.append((first * PAGE, count * PAGE, offset))
        offset += count * PAGE
    return _diff(*ranges)


@FUZZ
@given(st.data())
def test_fuzz_memory_files_with_random_contents(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from([FULL, DIFF]))
    image = _consistent_image(data, kind)
    if data.draw(st.booleans()):  # a random description instead
        image = MemoryImage(kind, data.draw(file_names), data.draw(awkward_ints),
                            "", tuple(data.draw(st.lists(memory_ranges, max_size=4))))
    size = data.draw(st.sampled_from([image.file_size, max(0, image.file_size - PAGE), image.file_size + 1])
                     | st.integers(0, 40 * PAGE))
    size = max(0, min(size, 64 * PAGE))
    contents = data.draw(st.binary(max_size=256))
    options = data.draw(st.sampled_from(list(MEMORY_MODES.values())))
    image = dataclasses.replace(image, sha256=data.draw(st.sampled_from(["", "0" * 64])))
    with tempfile.TemporaryDirectory() as name, deadline(30):
        directory = Path(name)
        target = directory / ("memory.img" if kind == FULL else "memory.diff")
        with open(target, "wb") as handle:
            handle.truncate(size)
            handle.seek(data.draw(st.integers(0, size)))
            handle.write(contents)
        if data.draw(st.booleans()):
            image = dataclasses.replace(image, sha256=file_sha256(target))
        with contextlib.suppress(StateError):
            restore_memory(directory, image, **options)
