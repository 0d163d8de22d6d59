"""`pyrovisor host` with a few small OS guests: the API (create, list, stop, target, metrics), admission, a crash or a
stop that leaves the others running, the balloon following the policy, a guest that ignores its balloon, bad input."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyrovisor.api.client import ApiClient
from pyrovisor.catalog import guests_dir
from pyrovisor.errors import ControlError
from pyrovisor.host.api import raw_get, serve
from pyrovisor.host.config import HostSettings, SamplingSettings, VmSpec, parse_vm_spec
from pyrovisor.host.host import Host
from pyrovisor.host.policy import PolicySettings

pytestmark = pytest.mark.kvm

MiB = 1 << 20
# The built OS guest has a balloon driver (guests/os/balloon.c, issue 12) when its kernel carries the driver's message.
GUEST_DRIVER = b"os: balloon: target" in (guests_dir() / "os.elf").read_bytes()
BEAT = re.compile(rb"counter \d+: beat (\d+)")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def beats(log: Path) -> int:
    found = BEAT.findall(log.read_bytes()) if log.exists() else []
    return int(found[-1]) if found else 0


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    settings = HostSettings(budget=768 * MiB, log_dir=tmp_path / "logs", overhead=128 * MiB, overhead_per_vm=8 * MiB,
                            policy=PolicySettings(interval_s=0.2, balloon_timeout_s=1.0),
                            sampling=SamplingSettings(sample_pages=256, interval_s=0.3))
    with Host(settings) as running:
        yield running


@pytest.fixture
def api(host: Host, tmp_path: Path) -> Iterator[ApiClient]:
    server = serve(host, tmp_path / "host.sock")
    try:
        yield ApiClient(tmp_path / "host.sock", timeout=60)
    finally:
        server.close()


def counter_vm(vm_id: str, memory: str = "64M", **extra: object) -> dict[str, object]:
    return {"id": vm_id, "guest": "os", "memory": memory, "vcpus": 1, "args": "counter count=0 period_ms=50", **extra}


def status_of(error: pytest.ExceptionInfo[ControlError]) -> int | None:
    return error.value.status


def test_create_list_stop_and_bad_requests_through_the_api(host: Host, api: ApiClient, tmp_path: Path) -> None:
    first = api.post("/vms", counter_vm("a"))
    assert first["state"] == "running" and first["configured"] == 64 * MiB
    api.post("/vms", counter_vm("b", shares=3000))
    listing = api.get("/vms")
    assert [vm["vm_id"] for vm in listing["vms"]] == ["a", "b"]
    assert listing["host"]["running"] == 2 and listing["host"]["budget"] == 768 * MiB
    log_a, log_b = tmp_path / "logs" / "a.log", tmp_path / "logs" / "b.log"
    wait_for(lambda: beats(log_a) >= 3 and beats(log_b) >= 3, "both counters beating")

    bad: list[tuple[str, str, dict[str, object] | None, int, str]] = [
        ("POST", "/vms", {"guest": "nosuch"}, 400, "not a file and not a built-in guest"),
        ("POST", "/vms", {"memory": "64M"}, 400, "missing"),
        ("POST", "/vms", counter_vm("a"), 409, "already in use"),
        ("POST", "/vms", counter_vm("huge", memory="1G", min="700M"), 409, "does not fit"),
        ("GET", "/vms/nosuch", None, 404, "no VM with id 'nosuch'"),
        ("POST", "/vms/nosuch/stop", {}, 404, "no VM"),
        ("PUT", "/vms/a/target", {"memory_mib": "lots"}, 400, "must be a number"),
        ("PUT", "/vms/a/target", {"memory_mib": 4}, 400, "between the VM's minimum"),
        ("PUT", "/vms/a/target", {"size": 4}, 400, "unknown field"),
        ("PUT", "/vms/nosuch/target", {"memory_mib": 40}, 404, "no VM"),
        ("PATCH", "/vms/a", {}, 405, "not allowed"),
    ]
    for method, path, body, status, message in bad:
        with pytest.raises(ControlError) as caught:
            api.request(method, path, body)
        assert caught.value.status == status and message in str(caught.value), (method, path, str(caught.value))
        assert "\n" not in str(caught.value)

    assert api.post("/vms/a/stop") == {"id": "a", "state": "stopped"}
    before = beats(log_b)
    wait_for(lambda: beats(log_b) >= before + 5, "the other VM keeps running")
    assert [vm["vm_id"] for vm in api.get("/vms")["vms"]] == ["b"]
    assert api.get("/status")["running"] == 1


def test_a_crash_and_a_failing_guest_leave_the_others_running(host: Host, api: ApiClient, tmp_path: Path) -> None:
    api.post("/vms", counter_vm("steady"))
    api.post("/vms", counter_vm("crash"))
    api.post("/vms", {"id": "fault", "guest": "os", "memory": "64M", "vcpus": 1,
                      "args": "counter count=0 period_ms=50; fault mode=write start_ms=1500"})
    log = tmp_path / "logs" / "steady.log"
    wait_for(lambda: beats(log) >= 3 and beats(tmp_path / "logs" / "crash.log") >= 3, "the guests running")
    crashing = host.get("crash").vmm
    with crashing.paused("test: wipe the kernel"):
        crashing.memory.fill(0, 16 * MiB, 0)  # the guest's kernel and page tables: a triple fault follows

    def states() -> dict[str, str]:
        return {vm["vm_id"]: vm["state"] for vm in api.get("/vms")["vms"]}

    wait_for(lambda: states() == {"steady": "running", "crash": "failed", "fault": "failed"}, "both failures seen")
    details = {vm["vm_id"]: vm["detail"] for vm in api.get("/vms")["vms"]}
    assert "shutdown" in details["crash"] and "exited with code 2" in details["fault"]
    before = beats(log)
    wait_for(lambda: beats(log) >= before + 5, "the steady VM keeps beating")
    assert api.get("/status")["running"] == 1
    api.post("/vms/crash/stop")  # a failed VM's record is removed by a stop
    assert sorted(states()) == ["fault", "steady"]


def test_metrics_parse_and_carry_every_vm(host: Host, api: ApiClient, tmp_path: Path) -> None:
    api.post("/vms", counter_vm("m1"))
    api.post("/vms", {"id": "m2", "guest": "os", "memory": "64M", "vcpus": 1,
                      "args": "memcheck mib=16 passes=0 interval_ms=20"})
    wait_for(lambda: (host.get("m2").working_set()[0] or 0) > 8 * MiB, "a working-set estimate")
    status, content_type, text = raw_get(tmp_path / "host.sock", "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in ("pyrovisor_vm_configured_bytes", "pyrovisor_vm_balloon_target_bytes", "pyrovisor_vm_balloon_actual_bytes",
                 "pyrovisor_vm_resident_bytes", "pyrovisor_vm_working_set_bytes", "pyrovisor_vm_working_set_low_bytes",
                 "pyrovisor_vm_working_set_high_bytes", "pyrovisor_vm_allocation_bytes",
                 "pyrovisor_vm_balloon_requests_ignored", "pyrovisor_host_rss_bytes", "pyrovisor_host_budget_bytes"):
        assert name in families, name
    by_vm = {sample.labels["vm"]: sample.value for sample in families["pyrovisor_vm_working_set_bytes"].samples}
    assert by_vm["m2"] > 8 * MiB > by_vm["m1"], "memcheck's 16 MiB against an idle counter"
    resident = {sample.labels["vm"]: sample.value for sample in families["pyrovisor_vm_resident_bytes"].samples}
    assert resident["m2"] >= 16 * MiB and resident["m1"] < 16 * MiB
    assert families["pyrovisor_host_budget_bytes"].samples[0].value == 768 * MiB
    host_rss = families["pyrovisor_host_rss_bytes"].samples[0].value
    assert host_rss > sum(resident.values())


def test_a_guest_that_ignores_its_balloon_is_reported_not_waited_on(host: Host, api: ApiClient) -> None:
    """`ticker` has no balloon driver: a target pinned by hand is never followed."""
    api.post("/vms", {"id": "deaf", "guest": "ticker", "memory": "64M", "args": "ticks=100000 period_ms=10"})
    started = time.monotonic()
    answer = api.request("PUT", "/vms/deaf/target", {"memory_mib": 40})
    assert time.monotonic() - started < 5, "setting a target does not wait for the guest"
    assert answer["pinned"] and answer["allocation"] == 40 * MiB and answer["balloon_target"] == 24 * MiB
    wait_for(lambda: api.get("/vms/deaf")["unresponsive"], "the ignored request reported", timeout=10)
    vm = api.get("/vms/deaf")
    assert vm["ignored"] == 1 and "ignores its balloon" in vm["detail"] and vm["balloon_actual"] == 0
    _, _, text = raw_get(Path(api.socket_path), "/metrics")
    assert 'pyrovisor_vm_balloon_requests_ignored_total{vm="deaf"} 1.0' in text
    assert 'pyrovisor_vm_balloon_unresponsive{vm="deaf"} 1.0' in text
    api.request("PUT", "/vms/deaf/target", {"memory_mib": None})
    assert not api.get("/vms/deaf")["pinned"]


def test_the_balloon_follows_the_policy(tmp_path: Path) -> None:
    """Two 256 MiB guests under a budget that holds 320 MiB of guests: the idle one gives up the idle memory the tax
    takes, the busy one keeps its working set; when the idle one starts working, its target rises at once."""
    settings = HostSettings(budget=448 * MiB, log_dir=tmp_path / "logs", overhead=128 * MiB, overhead_per_vm=0,
                            policy=PolicySettings(interval_s=0.2, balloon_timeout_s=60.0),
                            sampling=SamplingSettings(sample_pages=1024, interval_s=0.3))
    with Host(settings) as host:
        def spec(vm_id: str, args: str) -> VmSpec:
            return parse_vm_spec({"id": vm_id, "guest": "os", "memory": "256M", "vcpus": 1, "args": args}, vm_id,
                                 32 * MiB, settings.log_dir)

        host.create(spec("busy", "memcheck mib=96 passes=0 interval_ms=10"))
        host.create(spec("idle", "counter count=0 period_ms=100; memcheck mib=160 passes=0 interval_ms=10 "
                                 "start_ms=10000"))
        busy, idle = host.get("busy"), host.get("idle")
        wait_for(lambda: (busy.working_set()[0] or 0) > 80 * MiB, "the busy VM's working set seen")
        wait_for(lambda: idle.allocation <= busy.allocation - 64 * MiB, "the idle VM ballooned down")
        assert busy.allocation >= (busy.working_set()[0] or 0)
        assert busy.allocation + idle.allocation <= host.available()
        assert idle.balloon.target_pages * 4096 == 256 * MiB - idle.allocation > 0, "the device carries the target"
        if GUEST_DRIVER:
            wait_for(lambda: abs(idle.balloon.actual_pages - idle.balloon.target_pages) < 256,
                     "the guest's balloon reaching its target", timeout=15)
        low = idle.allocation
        wait_for(lambda: (idle.working_set()[0] or 0) > 140 * MiB, "the idle VM's growth seen", timeout=30)
        grown_at = time.monotonic()
        wait_for(lambda: idle.allocation >= 150 * MiB, "its target raised", timeout=3)
        assert time.monotonic() - grown_at < 1.0, "raised within the interval that saw the growth"
        assert idle.allocation > low + 32 * MiB
        assert busy.allocation + idle.allocation <= host.available()
        if GUEST_DRIVER:
            assert not any(vm.watch.unresponsive for vm in (busy, idle))


# --- the command line ----------------------------------------------------------------------------------------------
def run_pyrovisor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovisor", *args], capture_output=True, text=True, timeout=timeout)


def test_the_host_command_serves_its_config_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text('[host]\nbudget = "512M"\nlog_dir = "logs"\ninterval_s = 0.2\n[sampling]\nsample_pages = 128\n'
                      '[[vm]]\nid = "one"\nguest = "os"\nmemory = "64M"\nvcpus = 1\n'
                      'args = "counter count=0 period_ms=50"\n')
    sock = tmp_path / "api.sock"
    process = subprocess.Popen([sys.executable, "-m", "pyrovisor", "host", "--config", str(config), "--api", str(sock)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock.exists, "the host's socket", timeout=30)
        created = run_pyrovisor("host-ctl", str(sock), "create", "--guest", "os", "--memory", "64M", "--vcpus", "1",
                                "--args", "counter count=0 period_ms=50", "--id", "two", "--json")
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["configured"] == 64 * MiB
        listing = run_pyrovisor("ctl", str(sock), "host", "list", "--json")
        assert [vm["vm_id"] for vm in json.loads(listing.stdout)["vms"]] == ["one", "two"]
        table = run_pyrovisor("host-ctl", str(sock), "list")
        assert "one" in table.stdout and "working set" in table.stdout
        for args, message in ((("stop", "nosuch"), "no VM with id 'nosuch'"),
                              (("target", "one", "lots"), "invalid memory target 'lots'"),
                              (("create", "--guest", "nosuch"), "not a file and not a built-in guest")):
            refused = run_pyrovisor("host-ctl", str(sock), *args)
            assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and message in refused.stderr, \
                refused.stderr
        metrics = run_pyrovisor("host-ctl", str(sock), "metrics")
        assert 'pyrovisor_vm_up{vm="two"} 1.0' in metrics.stdout
        assert run_pyrovisor("host-ctl", str(sock), "stop", "two").stdout.strip() == "two: stopped"
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "one: started" in stderr and "SIGTERM received" in stderr
    assert not sock.exists()


@pytest.mark.parametrize(("text", "message"), [
    ('[host]\nbudget = "512M"\n[[vm]]\nguest = "nosuch"\n', "not a file and not a built-in guest"),
    ('[host]\nbudget = "256M"\noverhead = "128M"\n[[vm]]\nguest = "os"\nmemory = "256M"\nmin = "200M"\n',
     "cannot admit VM 'vm1'"),
    ('[host]\nbudget = "512M"\n[[vm]\n', "not valid TOML"),
])
def test_bad_host_configs_are_one_line_and_start_nothing(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "host.toml"
    config.write_text(text)
    result = run_pyrovisor("host", "--config", str(config))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.stderr.startswith("pyrovisor: error:")
