"""Migration endpoints: HOST:PORT for TCP, unix:PATH (or a path) for Unix sockets."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.errors import ConfigError, MigrationError

SOCKET_BUFFER = 8 << 20
SOCKET_MODE = 0o600  # a Unix listening socket: only its owner may connect


@dataclass(frozen=True)
class Address:
    host: str | None = None
    port: int | None = None
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if self.host is not None and ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_local(self) -> bool:
        """Only this host can reach it: a Unix socket (mode 0600) or a loopback address."""
        if self.path is not None:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:
            return False  # a host name: whatever it resolves to may be reachable from elsewhere


def parse_address(text: str) -> Address:
    if text.startswith("unix:") or text.startswith("/") or text.startswith("./"):
        path = text.removeprefix("unix:")
        if not path:
            raise ConfigError("address", text, "unix: needs a socket path")
        return Address(path=Path(path))
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("address", text, "expected HOST:PORT (e.g. 127.0.0.1:4444) or unix:PATH")
    return Address(host=host.strip("[]"), port=int(port))


def _tune(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(address: Address, timeout: float) -> socket.socket:
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(address.path))
        else:
            assert address.host is not None and address.port is not None
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
    except OSError as exc:
        raise MigrationError("connect", f"cannot reach {address}: {exc.strerror or exc}") from None
    _tune(sock)
    return sock


def listen(address: Address) -> socket.socket:
    try:
        if address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                if address.path.is_socket():
                    address.path.unlink()
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with contextlib.suppress(OSError):  # the file is created with this mode (less the umask)
                    os.fchmod(server.fileno(), SOCKET_MODE)
                server.bind(str(address.path))
                os.chmod(address.path, SOCKET_MODE)
            except OSError:
                server.close()
                raise
        else:
            assert address.host is not None and address.port is not None
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            server = socket.socket(family, socket.SOCK_STREAM)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((address.host, address.port))
        server.listen(1)
    except OSError as exc:
        raise ConfigError("--listen", str(address), exc.strerror or str(exc)) from None
    return server


def accept(server: socket.socket, timeout: float | None) -> socket.socket:
    server.settimeout(timeout)
    try:
        sock, _ = server.accept()
    except TimeoutError:
        raise MigrationError("listen", f"no source connected within {timeout} s") from None
    _tune(sock)
    return sock
