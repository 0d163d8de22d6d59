"""Quantitative models of memory-virtualization effects that the hardware hides, checked against published figures."""
