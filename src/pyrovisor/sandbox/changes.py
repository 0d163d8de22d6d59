"""Which pages a run changed against the base, and whose they are (kernel, or a process's user memory)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pyrovisor.arch.x86_64.paging import mappings
from pyrovisor.introspect import GuestKernel
from pyrovisor.memory import GuestMemory
from pyrovisor.sandbox.report import ChangedRange

PAGE = 4096


@dataclass(frozen=True)
class Owner:
    """A user page's owner: the process and the virtual address it maps the page at."""

    pid: int
    process: str
    virtual_address: int


def changed_pages(written: Iterable[int], memory: GuestMemory, base: GuestMemory) -> list[int]:
    """The written page numbers whose content now differs from the base's."""
    return [page for page in written if memory.read(page * PAGE, PAGE) != base.read(page * PAGE, PAGE)]


def user_owners(kernel: GuestKernel, pages: Iterable[int]) -> dict[int, Owner]:
    """For each of `pages` that some process maps in user mode: the first such process (pid order)."""
    wanted = set(pages)
    owners: dict[int, Owner] = {}
    user_top = kernel.profile.constant("USER_TOP")
    for process in sorted(kernel.processes(), key=lambda p: p.pid):
        for mapping in mappings(kernel.memory.read_u64, process.cr3, 0, user_top):
            if not mapping.user:
                continue
            first = mapping.physical_address // PAGE
            for index in range(mapping.size // PAGE):
                page = first + index
                if page in wanted and page not in owners:
                    owners[page] = Owner(process.pid, process.name, mapping.virtual_address + index * PAGE)
    return owners


def merge_ranges(pages: list[int], owners: dict[int, Owner]) -> tuple[ChangedRange, ...]:
    """Runs of consecutive pages with the same owner (and, for user pages, consecutive addresses)."""
    ranges: list[ChangedRange] = []
    for page in sorted(pages):
        owner = owners.get(page)
        if ranges:
            last = ranges[-1]
            follows = last.gpa // PAGE + last.pages == page
            same = (owner is None and last.kind == "kernel") or (
                owner is not None and last.pid == owner.pid and last.virtual_address is not None
                and last.virtual_address + last.pages * PAGE == owner.virtual_address)
            if follows and same:
                ranges[-1] = ChangedRange(last.gpa, last.pages + 1, last.kind, last.pid, last.process,
                                          last.virtual_address)
                continue
        if owner is None:
            ranges.append(ChangedRange(page * PAGE, 1, "kernel"))
        else:
            ranges.append(ChangedRange(page * PAGE, 1, "user", owner.pid, owner.process, owner.virtual_address))
    return tuple(ranges)


def user_pages_by_pid(owners: dict[int, Owner]) -> dict[int, tuple[int, ...]]:
    by_pid: dict[int, list[int]] = {}
    for owner in owners.values():
        by_pid.setdefault(owner.pid, []).append(owner.virtual_address)
    return {pid: tuple(sorted(vas)) for pid, vas in sorted(by_pid.items())}
