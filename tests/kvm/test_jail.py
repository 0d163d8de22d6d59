"""The jail (--jail DIR) with real guests: confined runs, what the jailed VMM can see and do, its cgroup's memory
limit, snapshot, restore, migration and the sandbox confined, and the one-line refusals. Runs as root (as CI does):
the jail needs CAP_SYS_ADMIN; without it every test here fails on purpose instead of being skipped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import VmmProcess, assert_guest_continued, beats_in, restore_and_read
from test_migration import Receiver, free_port, start_source

from pyrovisor.api.client import ApiClient
from pyrovisor.catalog import load_catalog
from pyrovisor.confine.capabilities import PR_CAPBSET_DROP, CapSet, prctl, privileges

pytestmark = pytest.mark.kvm

NOBODY = 65534
PYROVISOR = (sys.executable, "-m", "pyrovisor")
ANNOUNCE = re.compile(r"^pyrovisor: jail (?P<dir>\S+): uid 65534 gid 65534, namespaces mnt pid net ipc uts, "
                      r"cgroup v[12]", re.MULTILINE)


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.fail("the jail tests need root (CAP_SYS_ADMIN, CAP_SETUID, ...): run the suite as root, as CI does")


def jail_dir(tmp_path: Path, name: str = "jail") -> Path:
    """A jail directory the jailed user may write in."""
    directory = tmp_path / name
    directory.mkdir()
    os.chown(directory, NOBODY, NOBODY)
    return directory


def pyrovisor(*args: str, timeout: float = 90, env: dict[str, str] | None = None,
              preexec_fn=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYROVISOR, *args], capture_output=True, text=True, errors="replace",
                          stdin=subprocess.DEVNULL, timeout=timeout, env=env, preexec_fn=preexec_fn)


def jailed_child(launcher: subprocess.Popen[str]) -> int:
    """The host PID of the jailed VMM: the launcher's only child."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.02)
    raise AssertionError("the launcher has no child")


@pytest.mark.parametrize("guest", ["hello", "os-fault", "chaos"])
def test_guest_output_and_exit_code_come_back(tmp_path: Path, guest: str) -> None:
    """A jailed run prints what the guest prints and exits with its exit code (os-fault: 2), the hostile guest
    included; stderr holds the jail's one line."""
    spec = load_catalog()[guest]
    result = pyrovisor("run", guest, "--jail", str(jail_dir(tmp_path)), timeout=spec.timeout)
    assert result.returncode == spec.exit_code, result.stderr
    for pattern in spec.expect:
        assert re.search(pattern, result.stdout, re.MULTILINE), (pattern, result.stdout[-2000:])
    assert ANNOUNCE.search(result.stderr), result.stderr
    assert "error" not in result.stderr


def test_the_jailed_vmm_sees_only_its_jail_and_holds_no_privilege(tmp_path: Path) -> None:
    """From inside (the test hook) and from outside (/proc/PID): its own root, one process, no host files; new
    namespaces; uid/gid 65534 with no groups, every capability set empty, no_new_privs; in the jail's cgroup."""
    directory = jail_dir(tmp_path)
    env = dict(os.environ, PYROVISOR_JAIL_PROBE="1")
    launcher = subprocess.Popen([*PYROVISOR, "run", "os-counter", "--args", "counter count=0 period_ms=20",
                                 "--jail", str(directory), "--api", str(directory / "api.sock"), "--jail-memory",
                                 "300M", "--jail-cpus", "1.5"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                stdin=subprocess.DEVNULL)
    try:
        child = jailed_child(launcher)
        deadline = time.monotonic() + 30
        while not (directory / "api.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        seen = privileges(child)
        assert seen.uids == (NOBODY,) * 4 and seen.gids == (NOBODY,) * 4 and seen.groups == ()
        assert all(seen.capabilities[kind] == 0 for kind in CapSet), seen.capabilities
        assert seen.no_new_privs
        for name in ("mnt", "pid", "net", "ipc", "uts"):
            assert os.readlink(f"/proc/{child}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}"), name
        root = Path(f"/proc/{child}/root")
        assert sorted(os.listdir(root)) == sorted({"dev", "proc", "tmp", *_top_folders(directory)})
        assert sorted(os.listdir(root / "dev")) == ["kvm", "null", "urandom", "zero"]
        assert (root / "dev" / "kvm").stat().st_uid == NOBODY
        # Not the host's processes: the VMM (PID 1) and its seccomp supervisor, forked after the jail was entered.
        jailed = {int(name): (root / "proc" / name / "comm").read_text().strip()
                  for name in os.listdir(root / "proc") if name.isdigit()}
        assert 1 in jailed and set(jailed) - {1} <= {pid for pid, comm in jailed.items() if comm == "pyro-seccomp"}
        assert len(jailed) <= 2, jailed
        for host_path in ("etc/passwd", "home", "usr/bin", "var", "boot", str(Path.cwd()).lstrip("/") + "/tests"):
            assert not (root / host_path).exists(), host_path
        assert (root / str(directory).lstrip("/") / "api.sock").is_socket()  # the jail directory, at its own path
        cgroups = Path(f"/proc/{child}/cgroup").read_text()
        memory_line = next(line for line in cgroups.splitlines() if re.match(r"^\d+:memory:|^0::", line))
        assert f"pyrovisor-jail-{launcher.pid}" in memory_line
        limit_files = _cgroup_files(memory_line)
        assert any(file.read_text().strip() == str(300 << 20) for file in limit_files)
        assert ApiClient(directory / "api.sock").get("/status")["state"] == "running"  # the API, from the host
        ApiClient(directory / "api.sock").post("/stop")
        _out, err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 0, err
    probe = json.loads(re.search(r"^pyrovisor: jail probe: (.*)$", err, re.MULTILINE)[1])
    assert probe["processes"] == [1] and probe["pid"] == 1
    assert probe["host_files"] == [] and probe["uid"] == NOBODY
    assert not (directory / "api.sock").exists()  # removed on the way out, as without the jail
    assert not list(Path("/sys/fs/cgroup").glob(f"**/pyrovisor-jail-{launcher.pid}"))  # and the cgroup


def _top_folders(directory: Path) -> set[str]:
    """The first folders of the paths bound into the jail: the jail directory's, Python's, pyrovisor's, libs'."""
    import pyrovisor

    paths = [directory, Path(sys.prefix), Path(sys.base_prefix), Path(pyrovisor.__file__)]
    paths += [Path(p) for p in ("/usr/lib", "/lib64") if Path(p).exists()]
    return {path.resolve().parts[1] for path in paths}


def _cgroup_files(line: str) -> list[Path]:
    """The memory limit files of the cgroup named in a /proc/PID/cgroup line (v1 or v2)."""
    _, _controllers, path = line.split(":", 2)
    mounts = [Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")]
    return [mount / path.lstrip("/") / name for mount in mounts for name in ("memory.limit_in_bytes", "memory.max")
            if (mount / path.lstrip("/") / name).exists()]


def test_the_cgroup_memory_limit_holds(tmp_path: Path) -> None:
    """A guest that touches 400 MiB in a jail limited to 192 MiB does not get it: the kernel's OOM killer stops
    the VMM at the limit, and the launcher says so in one line."""
    result = pyrovisor("run", "os", "--memory", "512M", "--args", "memcheck mib=400 passes=1",
                       "--jail", str(jail_dir(tmp_path)), "--jail-memory", "192M")
    assert result.returncode == 1, result.stderr
    error = result.stderr.splitlines()[-1]
    match = re.fullmatch(r"pyrovisor: error: --jail: cannot keep the VM running: the kernel's OOM killer stopped "
                         r"the VMM: its cgroup reached its memory limit of 192 MiB, peak ([\d.]+) MiB "
                         r"\(--jail-memory\)", error)
    assert match, error
    assert float(match[1]) <= 192
    assert "memcheck 1: pass 1 ok" not in result.stdout  # it never finished touching its 400 MiB


def test_snapshot_then_restore_confined(tmp_path: Path) -> None:
    """A jailed VM snapshots into its jail directory through the API; another jail restores it and the guest
    goes on."""
    directory = jail_dir(tmp_path)
    vm = VmmProcess(["run", "os", "--memory", "128M", "--args", "counter count=0 period_ms=20", "--jail",
                     str(directory)], directory / "api.sock")
    try:
        vm.wait_for_beat(5)
        vm.api.post("/snapshot", {"path": str(directory / "snap"), "kind": "full"})
        vm.api.post("/stop")
        assert vm.finish()[0] == 0
    finally:
        vm.kill()
    assert (directory / "snap" / "state").stat().st_uid == NOBODY
    before = vm.text()
    after = restore_and_read(directory / "snap", 10, "--jail", str(jail_dir(tmp_path, "restore")))
    last = beats_in(before.splitlines())[-1][0]
    assert beats_in(after.splitlines())[0][0] <= last + 1  # continued from the snapshot, not from a reboot


def test_receive_confined_over_a_socket_made_outside(tmp_path: Path) -> None:
    """`receive --jail` listens on the host's loopback through a socket the launcher made before leaving the
    host's network namespace; the unconfined source migrates into the jail and the guest goes on."""
    source = start_source(tmp_path)
    directory = jail_dir(tmp_path)
    port = free_port()
    receiver = Receiver(port, directory / "api.sock", extra=("--jail", str(directory)))
    try:
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "wait": True})
        assert status["state"] == "completed", status
        assert source.finish()[0] == 0
        time.sleep(0.5)
        code, out, err = receiver.stop()
        assert code == 0, err
        assert_guest_continued(source.text(), out)
    finally:
        source.kill()
        receiver.kill()


def test_confined_source_migrates_to_confined_receiver_by_unix_socket(tmp_path: Path) -> None:
    """Two jails, no network: the receiver's launcher makes its Unix socket inside the source's jail directory
    (owned by the jail's user), the jailed source migrates through it."""
    source_dir, receiver_dir = jail_dir(tmp_path, "source"), jail_dir(tmp_path, "receiver")
    source = VmmProcess(["run", "os", "--memory", "128M", "--vcpus", "2", "--args",
                         "counter count=0 period_ms=20; memcheck mib=8 passes=0 interval_ms=20", "--jail",
                         str(source_dir)], source_dir / "api.sock")
    migration_socket = source_dir / "migrate.sock"
    receiver = subprocess.Popen([*PYROVISOR, "receive", "--listen", f"unix:{migration_socket}", "--api",
                                 str(receiver_dir / "api.sock"), "--jail", str(receiver_dir), "--accept-timeout", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        source.wait_for_beat(5)
        source.wait_for(migration_socket.exists, "the receiver's socket")
        status = source.api.post("/migrate", {"to": f"unix:{migration_socket}", "wait": True})
        assert status["state"] == "completed", status
        assert source.finish()[0] == 0
        time.sleep(0.5)
        ApiClient(receiver_dir / "api.sock").post("/stop")
        out, err = receiver.communicate(timeout=30)
        assert receiver.returncode == 0, err
        assert_guest_continued(source.text(), out)
    finally:
        source.kill()
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()


def test_sandbox_confined(tmp_path: Path) -> None:
    """The sandbox's base and runs work in a jail: the base and the log are in the jail directory."""
    directory = jail_dir(tmp_path)
    made = pyrovisor("sandbox", "--make-base", str(directory / "base"), "--jail", str(directory))
    assert made.returncode == 0, made.stderr
    run = pyrovisor("sandbox", "--base", str(directory / "base"), "--run", "counter count=3 period_ms=10",
                    "--log", str(directory / "sandbox.log"), "--json", "--jail", str(directory))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)[0]
    assert report["outcome"] == "exited" and report["pages_changed"] > 0
    assert "counter" in (directory / "sandbox.log").read_text()


def test_sigterm_reaches_the_jailed_vmm(tmp_path: Path) -> None:
    """SIGTERM to the launcher stops the jailed guest cleanly (exit code 143), as without the jail."""
    directory = jail_dir(tmp_path)
    vm = VmmProcess(["run", "os", "--memory", "64M", "--args", "counter count=0 period_ms=20", "--jail",
                     str(directory)], directory / "api.sock")
    try:
        vm.wait_for_beat(3)
        vm.process.send_signal(signal.SIGTERM)
        code, err = vm.finish()
    finally:
        vm.kill()
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM received: the guest was stopped" in err


def _drop_sys_admin() -> None:
    prctl(PR_CAPBSET_DROP, 21)  # CAP_SYS_ADMIN: gone from the bounding set, so from the process after exec


@pytest.mark.parametrize("extra, message", [
    (("--tpm",), "--jail: cannot use --tpm: the vTPM runs swtpm, a separate program"),
    (("--net", "tap=pv0"), "--jail: cannot use --net: the tap device pv0 lives in the host's network namespace"),
    (("--api", "/tmp/elsewhere.sock"), "invalid --api '/tmp/elsewhere.sock': with --jail the VMM can only create"),
    (("--jail-uid", "4242"), "--jail: cannot use the jail directory: uid 4242 (gid 65534) cannot write in"),
])
def test_what_cannot_be_jailed_gets_one_line(tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    result = pyrovisor("run", "os", "--jail", str(jail_dir(tmp_path)), *extra)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"pyrovisor: error: {message}"), \
        result.stderr


def test_missing_privilege_and_bad_directory_get_one_line(tmp_path: Path) -> None:
    lacking = pyrovisor("run", "hello", "--jail", str(jail_dir(tmp_path)), preexec_fn=_drop_sys_admin)
    assert lacking.returncode == 1 and lacking.stdout == ""
    assert lacking.stderr == ("pyrovisor: error: --jail: cannot confine the VMM: this process lacks CAP_SYS_ADMIN "
                              "(run pyrovisor as root: the jail creates namespaces, mounts its root, makes /dev/kvm "
                              "and changes user)\n")
    file = tmp_path / "file"
    file.touch()
    for directory, reason in ((file, f"{file} is not a directory"),
                              (tmp_path / "missing" / "jail", f"{tmp_path / 'missing'} does not exist")):
        result = pyrovisor("run", "hello", "--jail", str(directory))
        assert result.returncode == 1
        assert result.stderr == f"pyrovisor: error: --jail: cannot use the jail directory: {reason}\n"
    unreadable = tmp_path / "disk.img"
    unreadable.write_bytes(bytes(1 << 20))
    unreadable.chmod(0o600)
    result = pyrovisor("run", "os", "--disk", str(unreadable), "--jail", str(jail_dir(tmp_path, "disk-jail")))
    assert result.returncode == 1
    assert result.stderr.startswith(f"pyrovisor: error: --jail: cannot put the VM's files in the jail: uid 65534 "
                                    f"(gid 65534) cannot read and write {unreadable}")
