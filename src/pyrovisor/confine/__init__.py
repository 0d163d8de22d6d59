"""Confinement of the VMM process: seccomp filters per kind of thread, and the jail (namespaces, cgroups)."""
