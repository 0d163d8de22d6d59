"""A software MMU for the nested-paging model: page tables as words in simulated memory, caches, walkers, traces.

Modules: `x86` (entry formats and levels of x86-64 and EPT tables), `memory` (sparse simulated physical
memory), `tables` (building a guest's page tables and the host's EPT for a set of pages),
`caches` (LRU caches: one object per cache for the reference walker, a batch function for the fast one),
`reference` (the walker that performs every reference, one access at a time), `batch` (the same walk
for a whole trace, stage by stage, and the stream of its references), `counts` (what both report),
`datacache` (which entry reads hit a data cache shared with the data) and `traces` (synthetic patterns
and trace files).
"""
