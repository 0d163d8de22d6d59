"""A TCP proxy for migration tests that understands the frame format and breaks the stream on purpose."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyrovisor.migration.protocol import FRAME, PREFIX, Integrity, MessageType, Role

# A rule sees each source→destination frame (type, header, payload) and returns what to do with it.
CUT = "cut"  # close both connections instead of forwarding this frame
CUT_INSIDE = "cut inside"  # forward the header and half the payload, then close both connections
FORWARD = "forward"


def retag(header: bytearray, payload: bytearray) -> None:
    """After a rule changed a frame (without a pre-shared key): a header and CRC that match it again."""
    magic, version, kind, _, sequence, covered, _ = FRAME.unpack(header)
    covered = len(payload) if kind != MessageType.PAGES else covered
    prefix = PREFIX.pack(magic, version, kind, len(payload), sequence, covered)
    header[:] = prefix + Integrity().frame_tag(Role.SOURCE, prefix, (payload[:covered],))


@dataclass
class FrameLog:
    types: list[MessageType] = field(default_factory=list)
    round_ends: int = 0
    cut: bool = False


Rule = Callable[[MessageType, bytearray, bytearray, FrameLog], str]


class FaultProxy:
    """Listens on 127.0.0.1:<port>, connects to `target`, forwards frames, applies `rule` to each."""

    def __init__(self, target: tuple[str, int], rule: Rule) -> None:
        self.target = target
        self.rule = rule
        self.log = FrameLog()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        client, _ = self.server.accept()
        upstream = socket.create_connection(self.target)
        pump = threading.Thread(target=self._pump_back, args=(upstream, client), daemon=True)
        pump.start()
        try:
            while True:
                header = _read_exact(client, FRAME.size)
                if header is None:
                    break
                _, _, kind, length, _, _, _ = FRAME.unpack(header)
                payload = _read_exact(client, length)
                if payload is None:
                    break
                message = MessageType(kind)
                self.log.types.append(message)
                if message is MessageType.ROUND_END:
                    self.log.round_ends += 1
                action = self.rule(message, header, payload, self.log)
                if action == CUT_INSIDE:
                    upstream.sendall(header + payload[:len(payload) // 2])
                if action in (CUT, CUT_INSIDE):
                    self.log.cut = True
                    break
                try:
                    upstream.sendall(header + payload)
                except OSError:  # the destination gave up: its last words (an ERROR) reach the source first
                    pump.join(5)
                    break
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.server.close()

    @staticmethod
    def _pump_back(upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass


def _read_exact(sock: socket.socket, count: int) -> bytearray | None:
    buffer = bytearray(count)
    view = memoryview(buffer)
    position = 0
    while position < count:
        received = sock.recv_into(view[position:])
        if received == 0:
            return None
        position += received
    return buffer
