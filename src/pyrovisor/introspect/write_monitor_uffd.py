"""UffdWriteWatcher: the address-only write-monitor mode, userfaultfd write protection answered by a server process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyrovisor.confine.policy import enter_thread, start_thread
from pyrovisor.errors import ConfigError, PyrovisorError
from pyrovisor.helper_process import reap, start_helper
from pyrovisor.memory.region import Backing
from pyrovisor.memory.userfault import (
    FEATURE_EXACT_ADDRESS,
    FEATURE_PAGEFAULT_FLAG_WP,
    FEATURE_THREAD_ID,
    FEATURE_WP_HUGETLBFS_SHMEM,
    FEATURE_WP_UNPOPULATED,
    PAGE_SIZE,
    open_with_features,
)

if TYPE_CHECKING:
    from pyrovisor.introspect.watch import Watch
    from pyrovisor.introspect.write_monitor import WriteMonitor
    from pyrovisor.memory import GuestMemory

SERVER_TIMEOUT_S = 10.0
WANTED_FEATURES = (FEATURE_PAGEFAULT_FLAG_WP | FEATURE_THREAD_ID | FEATURE_EXACT_ADDRESS | FEATURE_WP_HUGETLBFS_SHMEM
                   | FEATURE_WP_UNPOPULATED)
VMM_THREAD = "vmm"  # the writer of a record when the faulting thread is not a vCPU's


def check_protectable(memory: GuestMemory, watch: Watch) -> None:
    """Userfaultfd write-protects anonymous and memfd RAM, not RAM mapped copy-on-write from a snapshot file."""
    for page in watch.pages():
        if memory.region_of(page * PAGE_SIZE).backing is Backing.FILE_PRIVATE:
            raise ConfigError("mode", "uffd", "guest RAM mapped from a snapshot file (a lazy restore) cannot be "
                                              "write-protected with userfaultfd: restore with --eager, or use mode "
                                              "memslot")


@dataclass(frozen=True)
class UffdFeatures:
    """What the kernel granted: the faulting thread's id, the exact faulting address (else the page's)."""

    thread_id: bool
    exact_address: bool


class UffdWriteWatcher:
    """Write-protects the host pages of a VM's uffd-mode watches; its fault server (wp_fault_server.py, one
    process per VM) answers the faults, and a reader thread here turns each one into a record of the monitor.

    The server is started on first use from a thread that may create processes (pyrovisor.confine's start_thread:
    the API thread that asks may not); that thread then reads the records, confined as a "wss" thread.
    """

    def __init__(self, monitor: WriteMonitor) -> None:
        self.monitor = monitor
        self.memory = monitor.memory
        self.features = UffdFeatures(False, False)
        self.dropped = 0
        self._control: socket.socket | None = None
        self._records: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._tids: dict[int, int] = {}
        self._reader = threading.Thread(target=self._start_and_read, name="write-monitor-uffd", daemon=True)
        start_thread(self._reader)
        if not self._ready.wait(SERVER_TIMEOUT_S):
            raise PyrovisorError("write monitor: the userfaultfd fault server did not start within "
                                 f"{SERVER_TIMEOUT_S:.0f} s")
        if self._failure is not None:
            raise self._failure

    # --- the server and its records (the reader thread) ------------------------------------------------
    def _start_and_read(self) -> None:
        try:
            self._start_server()
        except BaseException as exc:
            self._failure = exc if isinstance(exc, PyrovisorError) else PyrovisorError(
                f"write monitor: cannot start the userfaultfd mode: {type(exc).__name__}: {exc}")
            self._ready.set()
            return
        self._ready.set()
        enter_thread("wss")
        records = self._records
        assert records is not None
        while True:
            try:
                message = records.recv(256)
            except OSError:
                return
            if not message:
                return
            try:
                self._deliver(message)
            except Exception as exc:  # a record that cannot be built must not stop the others
                self.monitor.log_uffd_failure(exc)

    def _start_server(self) -> None:
        uffd, granted = open_with_features(WANTED_FEATURES, required=FEATURE_PAGEFAULT_FLAG_WP)
        self.features = UffdFeatures(bool(granted & FEATURE_THREAD_ID), bool(granted & FEATURE_EXACT_ADDRESS))
        try:
            control, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            records, records_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                theirs = (control_theirs.fileno(), records_theirs.fileno())
                self._process = start_helper("pyrovisor.introspect.wp_fault_server", [str(fd) for fd in theirs], theirs)
            finally:
                control_theirs.close()
                records_theirs.close()
            control.settimeout(SERVER_TIMEOUT_S)
            self._control, self._records = control, records
            self._command(b"uffd", (uffd,))
        finally:
            os.close(uffd)  # the server holds it now; when it exits the kernel unregisters everything

    def _deliver(self, message: bytes) -> None:
        stamp, tid_text, address_text, _ = message.split()
        tid, address = int(tid_text), int(address_text)
        gpa = self._guest_physical(address)
        if gpa is None:
            return
        page = gpa & ~(PAGE_SIZE - 1)
        vcpu = self._vcpu_of(tid) if self.features.thread_id else None
        record: dict[str, Any] = {
            "time": float(stamp), "vcpu": VMM_THREAD if vcpu is None and self.features.thread_id else vcpu,
            "tid": tid if self.features.thread_id else None,
            "address": f"{gpa if self.features.exact_address else page:#x}", "page": f"{page:#x}",
            "exact": self.features.exact_address, "mode": "uffd"}
        for watch in self.monitor.watches:
            if watch.mode == "uffd" and page // PAGE_SIZE in watch.pages():
                self.monitor.keep(watch, {**record, "watch": watch.id})

    def _vcpu_of(self, tid: int) -> int | None:
        if tid not in self._tids:
            for vcpu in self.monitor.vmm.vcpus:
                thread = getattr(vcpu, "_thread", None)
                if thread is not None and thread.native_id is not None:
                    self._tids[thread.native_id] = vcpu.index
        return self._tids.get(tid)

    def _guest_physical(self, host_address: int) -> int | None:
        for region in self.memory.regions:
            if region.host_address <= host_address < region.host_address + region.size:
                return region.gpa + host_address - region.host_address
        return None

    # --- watches (any thread; vCPUs parked or not) ---------------------------------------------------------
    def protect(self, watch: Watch, others: Iterable[Watch]) -> None:
        """Write-protect the pages of `watch` that no other uffd watch already protects."""
        pages = self._new_pages(watch, others)
        if pages:
            self._command(b"protect " + b" ".join(str(page).encode() for page in pages))

    def unprotect(self, watch: Watch, others: Iterable[Watch]) -> None:
        """Lift the protection of the pages of `watch` that no other uffd watch covers."""
        pages = self._new_pages(watch, others)
        if pages:
            self._command(b"unprotect " + b" ".join(str(page).encode() for page in pages))

    def _new_pages(self, watch: Watch, others: Iterable[Watch]) -> list[int]:
        check_protectable(self.memory, watch)
        taken = set().union(*(other.pages() for other in others if other.mode == "uffd" and other.id != watch.id))
        hosts = []
        for page in sorted(watch.pages() - taken):
            region = self.memory.region_of(page * PAGE_SIZE)
            hosts.append(region.host_address + page * PAGE_SIZE - region.gpa)
        return hosts

    def _command(self, text: bytes, fds: tuple[int, ...] = ()) -> None:
        control = self._control
        if control is None:
            raise PyrovisorError("write monitor: the userfaultfd fault server has stopped")
        with self._lock:
            try:
                if fds:
                    socket.send_fds(control, [text], list(fds))
                else:
                    control.sendall(text)
                answer = control.recv(512)
            except OSError as exc:
                answer = f"error {exc}".encode()
        if answer != b"ok":
            detail = answer.decode(errors="replace").removeprefix("error ") or "no answer"
            raise PyrovisorError(f"write monitor: the userfaultfd fault server failed ({detail})")

    @property
    def server_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """Stop the server (the kernel then unregisters every page and wakes any writer) and reap it."""
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(OSError):
                control.close()
        if self._process is not None:
            reap(self._process, SERVER_TIMEOUT_S)
        self._reader.join(SERVER_TIMEOUT_S)
        if self._records is not None:
            self._records.close()
