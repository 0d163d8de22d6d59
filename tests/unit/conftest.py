"""Fixtures shared by the unit tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from pyrovisor.migration.protocol import Connection, Role


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Connection]]:
    """The two ends of a migration stream over a socketpair: (source, destination)."""
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    yield Connection(left, Role.SOURCE), Connection(right, Role.DESTINATION)
    left.close()
    right.close()
