"""A software MMU for the nested-paging model: page tables as words in simulated memory, caches, walkers, traces.

Modules: `x86` (entry formats and levels of x86-64 and EPT tables), `memory` (sparse simulated physical
memory), `tables` (building a guest's page tables and the host's EPT for the pages a trace touches),
`caches` (LRU caches: one object per cache for the reference walker, a batch function for the fast one),
`reference` (the walker that performs every reference, one access at a time), `batch` (the same walk
for a whole trace, stage by stage), `counts` (what both report) and `traces` (synthetic patterns and
trace files).
"""
