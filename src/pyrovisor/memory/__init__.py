"""Guest physical memory: host mappings, bounds-checked typed access, dirty tracking."""

from pyrovisor.memory.guest_memory import GuestMemory
from pyrovisor.memory.page_set import PageSet
from pyrovisor.memory.region import MemoryRegion

__all__ = ["GuestMemory", "MemoryRegion", "PageSet"]
