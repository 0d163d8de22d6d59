"""The rule for a control-API socket path, shared by the command line (checked early) and the server."""

from __future__ import annotations

import os
from pathlib import Path

from pyrovisor.errors import ConfigError

SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def check_socket_path(path: Path) -> None:
    """Refuse, with ConfigError("--api", ...), a path that cannot name a Unix socket this process can create:
    a NUL byte, too long, or a folder that is missing or not writable."""
    encoded = os.fsencode(path)
    if b"\0" in encoded:
        raise ConfigError("--api", str(path), "the path contains a NUL byte")
    if len(encoded) > SOCKET_PATH_MAX:
        raise ConfigError("--api", str(path), f"the path is {len(encoded)} bytes long; a Unix socket path can have "
                          f"at most {SOCKET_PATH_MAX} (sun_path is 108 bytes with the final NUL)")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError("--api", str(path), f"{str(parent)!r} is not a directory")
    if not parent.is_dir():
        raise ConfigError("--api", str(path), f"the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("--api", str(path), f"permission denied: cannot create a socket in {str(parent)!r}")
