"""How much of a VM's RAM the host really holds (/proc/self/pagemap over its mappings) and how much a process holds.

Why pagemap and not mincore or smaps: mincore(2) reports a page as resident when it maps the shared zero page, and
the working-set sampler reads untouched guest pages (a read of a never-written THP range maps the 2 MiB huge zero
page), so an idle 128 MiB guest showed 100 MiB "resident" that cost the host nothing. pagemap says per page whether
it is present and whether it is mapped exclusively; the zero page never is, a guest's own anonymous page is.
/proc/self/smaps would also leave the zero page out, but it walks every mapping of the process (100 VMs' worth) for
every read; pagemap is read for exactly the VM's range, 8 bytes per 4 KiB page.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from pyrovisor.memory.region import MemoryRegion

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PRESENT = 1 << 63
EXCLUSIVE = 1 << 56  # PM_MMAP_EXCLUSIVE: mapped by this process only (not the zero page, not shared)
# Both flags are in the top byte of an entry (little-endian u64): the top bytes of the entries that lack either.
_WANTED_TOP = (PRESENT | EXCLUSIVE) >> 56
_NOT_RESIDENT = bytes(top for top in range(256) if top & _WANTED_TOP != _WANTED_TOP)
PAGEMAP = "/proc/self/pagemap"


def resident_bytes(regions: Sequence[MemoryRegion]) -> int:
    """Bytes of these guest RAM mappings backed by a page of their own now (present and exclusively mapped)."""
    total = 0
    with open(PAGEMAP, "rb", buffering=0) as pagemap:
        for region in regions:
            if region.closed:
                continue
            pages = region.size // PAGE_SIZE
            raw = os.pread(pagemap.fileno(), pages * 8, region.host_address // PAGE_SIZE * 8)
            total += len(raw[7::8].translate(None, _NOT_RESIDENT))  # entries with both flags set
    return total * PAGE_SIZE


def process_rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process (this one by default), from /proc; 0 if it is gone."""
    return _status_field(pid, "VmRSS")


def private_rss_bytes(pid: int | str) -> int:
    """RssAnon of a process: what it holds privately (its shared libraries are counted once, in the host)."""
    return _status_field(pid, "RssAnon")


def _status_field(pid: int | str, name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def children_private_rss_bytes(pids: Iterable[int]) -> int:
    """The private memory of helper processes (the working-set fault servers)."""
    return sum(private_rss_bytes(pid) for pid in pids)
