"""EPT permission audit: the eight R/W/X combinations, which are legal, and pages that run but cannot be read.

Intel EPT (extended page tables) entries carry three permission bits: bit 0 read, bit 1 write, bit 2
execute. For bits 2:0 the Intel SDM (Vol. 3C, "EPT Misconfigurations", section 28.2.3.1 in the 2016
edition; 24.2.4.1 in older ones) says:

    000b                 not present: any access is an EPT violation (a VM exit the VMM can handle)
    010b (write-only)    EPT misconfiguration
    110b (write+execute) EPT misconfiguration
    100b (execute-only)  legal only if IA32_VMX_EPT_VPID_CAP (MSR 48CH) bit 0 is 1, else a misconfiguration
    any other value      legal; an access the bits do not allow is an EPT violation

So writing requires reading, and execute-only is an optional capability (Appendix A.10 of the SDM:
"If bit 0 is read as 1, the logical processor allows software to configure EPT paging-structure entries
in which bits 2:0 have value 100b (indicating an execute-only translation)").

An execute-only page is the "invisible code" case: the guest's CPU can fetch and run instructions from
it, but every data read of it (by an in-guest scanner, a kernel integrity checker, a memory dump) is an
EPT violation that the VMM answers, for example by showing other bytes. Hypervisor-based hooking and
rootkits use exactly this split view; a VMM that audits its own EPT can list such pages. The audit also
flags writable+executable pages (code that can be rewritten in place) and misconfigured entries.

The synthetic guest (kernel text r-x, rodata r--, the rest rw- with random holes, and planted anomalies at
random places) is drawn once per seed; the finding counts do not depend on the seed, the holes do.

Source: Intel 64 and IA-32 Architectures Software Developer's Manual, Volume 3C: System Programming
Guide, section 28.2.3.1 (EPT Misconfigurations) and Appendix A.10 (VPID and EPT Capabilities).
"""

from __future__ import annotations

import argparse
import enum
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import Assumption, LabResult, Table
from pyrovisor.lab.stats import Estimate, add_seed_arguments, estimate, seeds_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

READ, WRITE, EXECUTE = 1, 2, 4
PAGE_SIZE = 4096


def permission_string(bits: int) -> str:
    return "".join(flag if bits & mask else "-" for flag, mask in (("r", READ), ("w", WRITE), ("x", EXECUTE)))


def parse_permissions(text: str) -> int:
    """'r-x' / 'rx' / '5' / '0b101' to bits."""
    text = text.strip().lower()
    if text and (text.isdigit() or text.startswith("0b") or text.startswith("0x")):
        value = int(text, 0)
        if not 0 <= value <= 7:
            raise ConfigError("permissions", text, "EPT permission bits are 0..7")
        return value
    bits = 0
    for char in text:
        if char == "r":
            bits |= READ
        elif char == "w":
            bits |= WRITE
        elif char == "x":
            bits |= EXECUTE
        elif char != "-":
            raise ConfigError("permissions", text, "use r, w, x and -")
    return bits


class EntryKind(enum.Enum):
    NOT_PRESENT = "not present"
    VALID = "valid"
    EXECUTE_ONLY = "exec-only"
    MISCONFIGURED = "misconfig"


def classify(bits: int, execute_only_supported: bool) -> EntryKind:
    """What the processor makes of EPT bits 2:0."""
    if not 0 <= bits <= 7:
        raise ValueError(f"EPT permission bits are 0..7, not {bits}")
    if bits == 0:
        return EntryKind.NOT_PRESENT
    if bits & WRITE and not bits & READ:
        return EntryKind.MISCONFIGURED
    if bits == EXECUTE:
        return EntryKind.EXECUTE_ONLY if execute_only_supported else EntryKind.MISCONFIGURED
    return EntryKind.VALID


class AccessResult(enum.Enum):
    ALLOWED = "ok"
    VIOLATION = "violation"
    MISCONFIGURATION = "misconfig"


def access(bits: int, kind: str, execute_only_supported: bool) -> AccessResult:
    """The result of a guest read ('r'), write ('w') or instruction fetch ('x') through an entry."""
    entry = classify(bits, execute_only_supported)
    if entry is EntryKind.MISCONFIGURED:
        return AccessResult.MISCONFIGURATION
    needed = {"r": READ, "w": WRITE, "x": EXECUTE}[kind]
    return AccessResult.ALLOWED if bits & needed else AccessResult.VIOLATION


@dataclass(frozen=True)
class Mapping:
    """One guest-physical page and its EPT permission bits."""

    gpa: int
    bits: int


class Finding(enum.Enum):
    EXECUTE_ONLY = "execute-only (invisible code)"
    WRITE_EXECUTE = "writable+executable"
    MISCONFIGURED = "misconfigured"


@dataclass(frozen=True)
class AuditReport:
    pages: int
    by_permission: dict[str, int]
    findings: dict[Finding, tuple[int, ...]]  # GPAs

    def count(self, finding: Finding) -> int:
        return len(self.findings[finding])

    def findings_counts(self) -> tuple[int, ...]:
        return tuple(len(gpas) for gpas in self.findings.values())


def audit(table: Iterable[Mapping], execute_only_supported: bool = True) -> AuditReport:
    """Find execute-only pages, writable+executable pages and misconfigured entries in a permission table."""
    findings: dict[Finding, list[int]] = {finding: [] for finding in Finding}
    counts: Counter[str] = Counter()
    pages = 0
    for mapping in table:
        pages += 1
        counts[permission_string(mapping.bits)] += 1
        kind = classify(mapping.bits, execute_only_supported)
        if kind is EntryKind.MISCONFIGURED:
            findings[Finding.MISCONFIGURED].append(mapping.gpa)
        elif kind is EntryKind.EXECUTE_ONLY:
            findings[Finding.EXECUTE_ONLY].append(mapping.gpa)
        elif mapping.bits & WRITE and mapping.bits & EXECUTE:
            findings[Finding.WRITE_EXECUTE].append(mapping.gpa)
    return AuditReport(pages, dict(sorted(counts.items())),
                       {finding: tuple(gpas) for finding, gpas in findings.items()})


@dataclass(frozen=True)
class GuestLayout:
    """A synthetic guest's EPT view: kernel text/rodata/data, user memory, and planted anomalies."""

    pages: int = 16384  # 64 MiB
    kernel_text_pages: int = 2048
    kernel_rodata_pages: int = 1024
    hidden_code_pages: int = 6
    write_execute_pages: int = 3
    misconfigured_pages: int = 2
    unmapped_share: float = 0.05
    seed: int = 3


def synthetic_table(layout: GuestLayout) -> list[Mapping]:
    """A plausible permission table (text r-x, rodata r--, the rest rw-, some holes) with planted cases."""
    rng = np.random.default_rng(layout.seed)
    bits = np.full(layout.pages, READ | WRITE, dtype=np.int64)
    text_end = layout.kernel_text_pages
    rodata_end = text_end + layout.kernel_rodata_pages
    if rodata_end + layout.hidden_code_pages + layout.write_execute_pages + layout.misconfigured_pages > layout.pages:
        raise ConfigError("--pages", layout.pages, "too small for the kernel image and planted pages")
    bits[:text_end] = READ | EXECUTE
    bits[text_end:rodata_end] = READ
    rest = np.arange(rodata_end, layout.pages)
    holes = rest[rng.random(len(rest)) < layout.unmapped_share]
    bits[holes] = 0
    candidates = np.setdiff1d(rest, holes)
    planted = rng.choice(candidates, size=layout.hidden_code_pages + layout.write_execute_pages
                         + layout.misconfigured_pages, replace=False)
    hidden = planted[:layout.hidden_code_pages]
    wx = planted[layout.hidden_code_pages:layout.hidden_code_pages + layout.write_execute_pages]
    bad = planted[layout.hidden_code_pages + layout.write_execute_pages:]
    bits[hidden] = EXECUTE
    bits[wx] = READ | WRITE | EXECUTE
    bits[bad] = np.resize([WRITE, WRITE | EXECUTE], len(bad))
    return [Mapping(page * PAGE_SIZE, int(b)) for page, b in enumerate(bits)]


def load_table(path: Path) -> list[Mapping]:
    """Read 'gpa permissions' lines (e.g. '0x7f000 r-x'; '#' comments, commas allowed)."""
    mappings = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError("--table", f"{path}:{number}", "expected 'gpa permissions'")
        try:
            gpa = int(fields[0], 0)
        except ValueError as exc:
            raise ConfigError("--table", f"{path}:{number}", f"bad address {fields[0]!r}") from exc
        mappings.append(Mapping(gpa, parse_permissions(fields[1])))
    return mappings


class PermissionAuditModel:
    name = "permissions"
    summary = "EPT R/W/X combinations (misconfigurations, execute-only) and an audit for invisible code"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = GuestLayout()
        parser.add_argument("--table", type=Path, default=None,
                            help="permission table file, lines 'gpa r-x' (default: a synthetic 64 MiB guest)")
        parser.add_argument("--no-execute-only", action="store_true",
                            help="processor without the execute-only capability (IA32_VMX_EPT_VPID_CAP bit 0 = 0)")
        synthetic = parser.add_argument_group("synthetic guest (ignored with --table)")
        synthetic.add_argument("--pages", type=int, default=d.pages,
                               help="guest size in 4 KiB pages (default: %(default)s)")
        synthetic.add_argument("--kernel-text-pages", type=int, default=d.kernel_text_pages,
                               help="kernel text, r-x (default: %(default)s)")
        synthetic.add_argument("--kernel-rodata-pages", type=int, default=d.kernel_rodata_pages,
                               help="kernel read-only data, r-- (default: %(default)s)")
        synthetic.add_argument("--unmapped-share", type=float, default=d.unmapped_share,
                               help="share of the rest left unmapped, at random (default: %(default)s)")
        synthetic.add_argument("--hidden-pages", type=int, default=d.hidden_code_pages,
                               help="execute-only pages to plant (default: %(default)s)")
        synthetic.add_argument("--wx-pages", type=int, default=d.write_execute_pages,
                               help="rwx pages to plant (default: %(default)s)")
        synthetic.add_argument("--misconfigured-pages", type=int, default=d.misconfigured_pages,
                               help="-w- / -wx entries to plant (default: %(default)s)")
        add_seed_arguments(parser, first=d.seed)  # the synthetic guest's layouts; ignored with --table

    def run(self, args: argparse.Namespace) -> LabResult:
        supported = not args.no_execute_only
        if args.table is not None:
            table = load_table(args.table)
            report = audit(table, supported)
            audits = [report]
            source = str(args.table)
            layout = None
        else:
            layout = layout_of(args)
            tables = [synthetic_table(replace(layout, seed=seed)) for seed in seeds_of(args)]
            audits = [audit(t, supported) for t in tables]
            table, report = tables[0], audits[0]
            source = f"synthetic guest, {args.pages} pages, {len(audits)} seeds"
        headline: tuple[tuple[str, float | Estimate], ...] = (
            ("execute-only pages", _over(audits, lambda a: a.count(Finding.EXECUTE_ONLY))),
            ("writable+executable pages", _over(audits, lambda a: a.count(Finding.WRITE_EXECUTE))),
            ("misconfigured pages", _over(audits, lambda a: a.count(Finding.MISCONFIGURED))),
            ("unmapped pages", _over(audits, lambda a: a.by_permission.get("---", 0))),
        )
        summary = [f"{report.count(Finding.EXECUTE_ONLY)} execute-only (invisible) pages, "
                   f"{report.count(Finding.WRITE_EXECUTE)} writable+executable, "
                   f"{report.count(Finding.MISCONFIGURED)} misconfigured, among {report.pages} entries"]
        if len(audits) > 1:
            same = all(a.findings_counts() == report.findings_counts() for a in audits)
            summary.append(f"the same counts in all {len(audits)} seeds' layouts" if same
                           else f"the counts differ between the {len(audits)} seeds' layouts: see the headline")
        return LabResult(
            tables=(combinations_table(), audit_table(audits, source, supported), findings_table(report)),
            plot=lambda figure: plot(figure, table, supported),
            summary=tuple(summary),
            headline=headline,
            assumptions=assumptions(layout, supported, args.table),
        )


def layout_of(args: argparse.Namespace) -> GuestLayout:
    if not 0 <= args.unmapped_share < 1:
        raise ConfigError("--unmapped-share", args.unmapped_share, "is a share, from 0 up to (not including) 1")
    counts = {"--pages": args.pages, "--kernel-text-pages": args.kernel_text_pages,
              "--kernel-rodata-pages": args.kernel_rodata_pages, "--hidden-pages": args.hidden_pages,
              "--wx-pages": args.wx_pages, "--misconfigured-pages": args.misconfigured_pages}
    for option, value in counts.items():
        if value < 0:
            raise ConfigError(option, value, "is a number of pages, not negative")
    return GuestLayout(pages=args.pages, kernel_text_pages=args.kernel_text_pages,
                       kernel_rodata_pages=args.kernel_rodata_pages, hidden_code_pages=args.hidden_pages,
                       write_execute_pages=args.wx_pages, misconfigured_pages=args.misconfigured_pages,
                       unmapped_share=args.unmapped_share, seed=args.seed)


def _over(audits: Sequence[AuditReport], count: Callable[[AuditReport], int]) -> float | Estimate:
    """A count from one audit, or its mean and 95 % interval over the seeds' layouts."""
    values = [float(count(a)) for a in audits]
    return values[0] if len(values) == 1 else estimate(values)


def assumptions(layout: GuestLayout | None, supported: bool, table: Path | None) -> tuple[Assumption, ...]:
    sdm = "Intel SDM Vol. 3C 28.2.3.1 (EPT Misconfigurations)"
    rules = (
        Assumption("write without read (010b, 110b)", "misconfiguration", sdm),
        Assumption("execute-only (100b)", "legal only with IA32_VMX_EPT_VPID_CAP bit 0",
                   "Intel SDM Vol. 3C Appendix A.10"),
        Assumption("execute-only capability", supported, "assumed (--no-execute-only for a processor without it)"),
        Assumption("page size KiB", PAGE_SIZE // 1024, "assumed (4 KiB leaf entries only; no large pages)"),
    )
    if layout is None:
        return (*rules, Assumption("permission table", str(table), "given (--table)"))
    synthetic = "assumed (synthetic guest layout, illustrative)"
    return (*rules,
            Assumption("guest pages", layout.pages, synthetic),
            Assumption("kernel text pages (r-x)", layout.kernel_text_pages, synthetic),
            Assumption("kernel rodata pages (r--)", layout.kernel_rodata_pages, synthetic),
            Assumption("unmapped share", layout.unmapped_share, synthetic),
            Assumption("planted execute-only pages", layout.hidden_code_pages, synthetic),
            Assumption("planted rwx pages", layout.write_execute_pages, synthetic),
            Assumption("planted misconfigured entries", layout.misconfigured_pages, synthetic))


def combinations_table() -> Table:
    rows = []
    for bits in range(8):
        row: list[object] = [f"{bits:03b}", permission_string(bits)]
        for supported in (True, False):
            row.append(classify(bits, supported).value)
        row += [access(bits, kind, True).value for kind in "rwx"]
        rows.append(tuple(row))
    return Table(
        title="EPT permission bits 2:0 (bit 0 read, 1 write, 2 execute)",
        columns=("bits", "perm", "exec-only cap", "no cap", "read", "write", "fetch"),
        rows=tuple(rows),
        notes=("exec-only cap / no cap: the entry on a processor with / without the execute-only capability; "
               "read / write / fetch: what a guest access does (with it). violation = EPT violation exit, "
               "misconfig = EPT misconfiguration exit.",
               "Intel SDM Vol. 3C 28.2.3.1: 010b and 110b are misconfigurations; 100b needs "
               "IA32_VMX_EPT_VPID_CAP bit 0."),
    )


def audit_table(audits: Sequence[AuditReport], source: str, supported: bool) -> Table:
    """Pages per permission; over several seeds (layouts), the mean and 95 % interval (one number if it never moves)."""
    permissions = sorted({perm for report in audits for perm in report.by_permission})
    rows = []
    for perm in permissions:
        counts = [float(report.by_permission.get(perm, 0)) for report in audits]
        pages: object = estimate(counts) if len(audits) > 1 else int(counts[0])
        rows.append((perm, pages, classify(parse_permissions(perm), supported).value))
    notes = ("pages: mean [95% CI] over the seeds' layouts where they differ (only the unmapped holes are random; "
             "the planted pages are placed at random but always counted in full).",) if len(audits) > 1 else ()
    return Table(title=f"Permission table: {source}", columns=("perm", "pages", "processor sees"), rows=tuple(rows),
                 notes=notes)


def findings_table(report: AuditReport, shown: int = 4) -> Table:
    rows = []
    for finding, gpas in report.findings.items():
        listed = ", ".join(f"{gpa:#x}" for gpa in gpas[:shown]) + (" ..." if len(gpas) > shown else "")
        rows.append((finding.value, len(gpas), listed or "-"))
    return Table(title="Audit findings", columns=("finding", "pages", "first guest-physical addresses"),
                 rows=tuple(rows))


_COLOURS = {"---": "#ffffff", "r--": "#9ecae1", "rw-": "#3182bd", "r-x": "#31a354", "rwx": "#fd8d3c",
            "--x": "#e6550d", "-w-": "#000000", "-wx": "#000000"}


def plot(figure: Figure, table: Sequence[Mapping], supported: bool) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    axes = figure.subplots()
    order = list(_COLOURS)
    width = 128
    rows = -(-len(table) // width)
    grid = np.zeros(rows * width, dtype=np.int64)
    for index, mapping in enumerate(sorted(table, key=lambda m: m.gpa)):
        grid[index] = order.index(permission_string(mapping.bits))
    axes.imshow(grid.reshape(rows, width), cmap=ListedColormap(list(_COLOURS.values())), vmin=0,
                vmax=len(order) - 1, aspect="auto", interpolation="nearest")
    flagged = [i for i, m in enumerate(sorted(table, key=lambda m: m.gpa))
               if classify(m.bits, supported) in (EntryKind.EXECUTE_ONLY, EntryKind.MISCONFIGURED)
               or (m.bits & WRITE and m.bits & EXECUTE)]
    axes.scatter([i % width for i in flagged], [i // width for i in flagged], s=60, facecolors="none",
                 edgecolors="red", linewidths=1.2)
    axes.set_xlabel(f"page within row ({width} pages = {width * PAGE_SIZE // 1024} KiB)")
    axes.set_ylabel("row of guest-physical memory")
    axes.set_title("EPT permissions by page (red circles: audit findings)")
    labels = {"---": "not mapped", "--x": "execute-only", "-w-": "misconfigured"}
    handles = [Patch(facecolor=colour, edgecolor="grey", label=labels.get(perm, perm))
               for perm, colour in _COLOURS.items() if perm != "-wx"]
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize="small")


MODEL = PermissionAuditModel()
