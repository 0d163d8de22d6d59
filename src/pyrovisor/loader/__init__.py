"""Guest image loaders: put an image into guest memory and say where to start it."""

from pyrovisor.loader.elf import LoadedSegment, LoadResult, load_elf

__all__ = ["LoadResult", "LoadedSegment", "load_elf"]
