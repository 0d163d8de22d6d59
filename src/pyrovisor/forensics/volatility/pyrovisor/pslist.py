"""`vol pyrovisor.pslist`: the process table of a saved pyrovisor OS guest, read with volatility3."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from volatility3.framework import constants, exceptions, interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import intel
from volatility3.framework.renderers import format_hints
from volatility3.framework.symbols import intermed

vollog = logging.getLogger(__name__)

DEFAULT_SYMBOLS = "pyrovisor/os"  # <symbol dir>/pyrovisor/os.json, written by `pyrovisor forensics isf`
DTB_SYMBOL = "pyrovisor_dtb"  # constant: physical address of the kernel's page-table root (kernel_pml4)
MAGIC_SYMBOL = "OS_INFO_MAGIC"  # constant: what os_info.magic holds once the kernel has set up
STATE_PREFIX = "PROC_"


class PluginError(SystemExit):
    """A problem with the image or the symbols: one line on stderr, exit code 1 (no volatility report)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"pyrovisor.pslist: error: {reason}")


class PsList(interfaces.plugins.PluginInterface):  # type: ignore[misc]  # volatility3 ships no type hints
    """Lists the processes of a pyrovisor OS guest from its kernel's process table.

    The kernel's page tables are found through the symbol table's pyrovisor_dtb constant (the physical
    address of kernel_pml4, from the kernel ELF's load segments); --dtb overrides it, e.g. with a CR3
    saved in the snapshot's state file.
    """

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[Any]:
        return [
            requirements.TranslationLayerRequirement(name="primary", description="the guest's physical memory"),
            requirements.StringRequirement(name="symbols", optional=True, default=DEFAULT_SYMBOLS,
                                           description="the ISF's name under a symbol directory (-s), no .json"),
            requirements.IntRequirement(name="dtb", optional=True,
                                        description="page-table root (physical) instead of the ISF's pyrovisor_dtb"),
        ]

    def run(self) -> Any:
        table = self._symbol_table()
        layer_name = self._kernel_layer(table)
        processes = list(self._read_processes(table, layer_name))  # any fault here is reported before the header
        return renderers.TreeGrid(
            [("Slot", int), ("PID", int), ("PPID", int), ("Name", str), ("State", str), ("CPU", int),
             ("CR3", format_hints.Hex), ("Offset(V)", format_hints.Hex)],
            ((0, row) for row in processes))

    # --- set-up ---------------------------------------------------------------------------------
    def _symbol_table(self) -> str:
        name = str(self.config.get("symbols", DEFAULT_SYMBOLS))
        sub_path, _, filename = name.rpartition("/")
        try:
            return str(intermed.IntermediateSymbolTable.create(self.context, self.config_path, sub_path, filename))
        except (OSError, ValueError, KeyError, exceptions.VolatilityException) as exc:
            raise PluginError(f"cannot load the symbol table {name!r} ({exc}); write it with "
                              f"'pyrovisor forensics isf --out DIR/{name}.json' and pass -s DIR") from None

    def _constant(self, table: str, name: str) -> int:
        try:
            symbol = self.context.symbol_space.get_symbol(table + constants.BANG + name)
        except exceptions.SymbolError:
            raise PluginError(f"the symbol table has no {name} (was it written by 'pyrovisor forensics isf'?)") from None
        if symbol.constant_data is None:
            raise PluginError(f"{name} in the symbol table is not a constant")
        return int.from_bytes(symbol.constant_data, "little")

    def _kernel_layer(self, table: str) -> str:
        """An Intel32e (4-level paging) layer over the guest's physical memory, rooted at the kernel's tables."""
        physical = self.context.layers[self.config["primary"]]
        while isinstance(physical, intel.Intel):  # an automagic stacked a guess on top: use what it reads
            physical = self.context.layers[physical.config["memory_layer"]]
        dtb = self.config.get("dtb")
        if dtb is None:
            dtb = self._constant(table, DTB_SYMBOL)
        config_path = interfaces.configuration.path_join(self.config_path, "pyrovisor_kernel")
        self.context.config[interfaces.configuration.path_join(config_path, "memory_layer")] = physical.name
        self.context.config[interfaces.configuration.path_join(config_path, "page_map_offset")] = int(dtb)
        layer = intel.Intel32e(self.context, config_path, self.context.layers.free_layer_name("pyrovisor_kernel"))
        self.context.add_layer(layer)
        return str(layer.name)

    # --- the process table ------------------------------------------------------------------------
    def _read_processes(self, table: str, layer_name: str) -> Iterator[tuple[Any, ...]]:
        kernel = self.context.module(table, layer_name, offset=0)
        layer = self.context.layers[layer_name]
        try:
            magic = int(kernel.object_from_symbol("os_info").magic)
        except exceptions.InvalidAddressException as exc:
            raise PluginError(f"not a pyrovisor OS guest image: its kernel's os_info is not mapped at "
                              f"{layer.canonicalize(exc.invalid_address):#x} (wrong image, wrong symbols or wrong --dtb)") from None
        expected = self._constant(table, MAGIC_SYMBOL)
        if magic != expected:
            raise PluginError(f"not a booted pyrovisor OS guest: os_info.magic is {magic:#x}, expected {expected:#x}")
        states = {value: name.removeprefix(STATE_PREFIX).lower()
                  for name, value in kernel.get_enumeration("proc_state").choices.items()}
        free = next(value for value, name in states.items() if name == "free")
        try:
            entries = list(kernel.object_from_symbol("proc_table"))
            rows = []
            for slot, entry in enumerate(entries):
                pid, state = int(entry.pid), int(entry.state)
                if state == free or not pid:
                    continue
                raw_name = layer.read(entry.name.vol.offset, entry.name.vol.count)
                rows.append((slot, pid, int(entry.parent), raw_name.split(b"\0", 1)[0].decode(errors="replace"),
                             states.get(state, f"proc_state#{state}"), int(entry.cpu), format_hints.Hex(entry.cr3),
                             format_hints.Hex(layer.canonicalize(entry.vol.offset))))
        except exceptions.InvalidAddressException as exc:
            raise PluginError(f"the process table is not readable at {layer.canonicalize(exc.invalid_address):#x}: "
                              "the image is truncated or corrupt") from None
        yield from rows
