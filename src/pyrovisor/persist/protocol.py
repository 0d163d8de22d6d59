"""Persist: the one protocol by which devices, vCPUs and the VM save and restore themselves."""

from __future__ import annotations

from typing import Protocol, Self, TypeVar

S = TypeVar("S")
A = TypeVar("A", contravariant=True)


class Persist(Protocol[S, A]):
    """A component that saves itself as a plain frozen State and is rebuilt from one.

    `args` carries what a State cannot hold: file descriptors, callbacks, interrupt lines, the bus it
    sits on. Snapshots, live migration and the sandbox all save and restore through this protocol.
    """

    def save(self) -> S: ...

    @classmethod
    def restore(cls, args: A, state: S) -> Self: ...
