"""The command line's argument handling: every command refuses bad values the same way, in one line, early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyrovisor.api.cli import build_parser, main

SOCKET = "/tmp/pyrovisor-test-no-such.sock"


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Parse `argv` as the command line would; it must fail as a usage error: code 2 and one line."""
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pyrovisor: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, typed, reason", [
    (["run", "--memory", "0"], "'0'", "between 2 MiB and 64 GiB"),
    (["run", "--memory", "1T"], "'1T'", "between 2 MiB and 64 GiB"),
    (["run", "-m", "3M"], "'3M'", "multiple of 2 MiB"),
    (["run", "--memory", "lots"], "'lots'", "expected a number"),
    (["run", "--memory", "100000G"], "'100000G'", "between 2 MiB and 64 GiB"),
    (["run", "--timeout", "-1"], "'-1'", "positive number of seconds"),
    (["run", "--timeout", "0"], "'0'", "positive number of seconds"),
    (["run", "--timeout", "nan"], "'nan'", "positive number of seconds"),
    (["run", "--vcpus", "0"], "'0'", "at least 1"),
    (["run", "--vcpus", "40"], "'40'", "between 1 and 32"),
    (["run", "--dirty-ring", "100"], "'100'", "power of two of at least 256"),
    (["run", "--dirty-ring", "-256"], "'-256'", "power of two of at least 256"),
    (["restore", "snap", "--timeout", "-1"], "'-1'", "positive number of seconds"),
    (["receive", "--listen", "127.0.0.1:0", "--timeout", "0"], "'0'", "positive number of seconds"),
    (["receive", "--listen", "127.0.0.1:0", "--accept-timeout", "-5"], "'-5'", "positive number of seconds"),
    (["sandbox", "--base", "b", "--run", "x", "--timeout", "0"], "'0'", "positive number of seconds"),
    (["sandbox", "--base", "b", "--run", "x", "--runs", "0"], "'0'", "at least 1"),
    (["sandbox", "--make-base", "b", "--memory", "0"], "'0'", "between 2 MiB and 64 GiB"),
    (["sandbox", "--make-base", "b", "--vcpus", "33"], "'33'", "between 1 and 32"),
    (["ctl", SOCKET, "migrate", "--to", "h:1", "--downtime-ms", "0"], "'0'", "positive number"),
    (["ctl", SOCKET, "migrate", "--to", "h:1", "--max-rounds", "0"], "'0'", "at least 1"),
    (["ctl", SOCKET, "migrate", "--to", "h:1", "--timeout-s", "-1"], "'-1'", "positive number of seconds"),
    (["ctl", SOCKET, "migrate", "--to", "h:1", "--max-bandwidth", "0"], "'0'", "more than 0 bytes"),
])
def test_every_command_refuses_bad_numbers_quoting_what_was_typed(
        argv: list[str], typed: str, reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(argv, capsys)
    assert typed in err and reason in err
    assert "MiB'" not in err  # the size as typed, not converted (was '1.04858e+06 MiB')


def test_sizes_and_limits_that_are_fine_pass() -> None:
    args = build_parser().parse_args(["run", "--memory", "2M", "--vcpus", "32", "--timeout", "0.5",
                                      "--dirty-ring", "4096"])
    assert (args.memory, args.vcpus, args.timeout, args.dirty_ring) == (2 << 20, 32, 0.5, 4096)
    assert build_parser().parse_args(["run", "--dirty-ring", "0"]).dirty_ring == 0


def test_api_socket_path_is_checked_before_anything_starts(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(["run", "--api", str(tmp_path / "missing" / "api.sock")], capsys)
    assert "does not exist" in err
    err = parse_error(["restore", "snap", "--api", str(tmp_path / ("x" * 120))], capsys)
    assert "at most 107" in err


def test_sandbox_run_refuses_flags_that_only_make_base_uses(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value in (("--memory", "1G"), ("--vcpus", "2")):
        with pytest.raises(SystemExit) as stopped:
            main(["sandbox", "--base", str(tmp_path), "--run", "pagetouch", flag, value])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert f"{flag} applies to --make-base" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["sandbox", "--base", str(tmp_path), "--run", "pagetouch", "--log", str(tmp_path / "no" / "log")])
    assert "does not exist" in capsys.readouterr().err


def test_lab_plot_path_is_checked_before_the_model_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for plot, reason in ((tmp_path / "missing" / "sev.png", "does not exist"),
                         (tmp_path / "sev.jpg", "ending in .png, .svg, .pdf")):
        with pytest.raises(SystemExit) as stopped:
            main(["lab", "sev", "--plot", str(plot)])
        assert stopped.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing computed
        assert captured.err.startswith("pyrovisor: error: lab sev: argument --plot") and reason in captured.err
        assert captured.err.count("\n") == 1


def test_lab_writes_the_plot_formats_it_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svg = tmp_path / "sev.svg"
    assert main(["lab", "sev", "--plot", str(svg)]) == 0
    assert b"<svg" in svg.read_bytes()[:1000]
    assert f"plot written to {svg}" in capsys.readouterr().out


def test_the_lab_registry_table_matches_the_models() -> None:
    from pyrovisor.lab.registry import MODELS, discover, get

    models = discover()
    assert list(MODELS) == list(models)
    for name, model in models.items():
        assert MODELS[name].summary == model.summary
        assert get(name) is model


def pyrovisor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovisor", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["ctl", SOCKET, "status"], f"no VMM control socket at {SOCKET}"),
    (["ctl", SOCKET, "explode"], "invalid choice: 'explode'"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["guests", "extra"], "unrecognized arguments: extra"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["lab", "nosuch"], "invalid choice: 'nosuch'"),
    (["lab", "sev", "--bogus"], "unrecognized arguments: --bogus"),
    (["sandbox", "--run", "x"], "one of the arguments --make-base --base is required"),
])
def test_errors_are_one_line(args: list[str], message: str) -> None:
    result = pyrovisor(*args)
    assert result.returncode in (1, 2)
    assert result.stderr.startswith("pyrovisor: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_ctl_status_imports_only_what_it_uses() -> None:
    """`ctl` registers every sub-command, yet it must not pay for numpy, matplotlib, the lab's models or KVM."""
    program = ("import sys\n"
               "from pyrovisor.api.cli import main\n"
               f"code = main(['ctl', {SOCKET!r}, 'status'])\n"
               "print(code, ' '.join(sorted(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    code, modules = result.stdout.split(" ", 1)
    loaded = set(modules.split())
    assert code == "1" and "no VMM control socket" in result.stderr
    assert "pyrovisor.api.cli" in loaded and "pyrovisor.lab.registry" in loaded  # the lab is registered
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("numpy", "matplotlib") or m.startswith("pyrovisor.kvm")
                   or (m.startswith("pyrovisor.lab.") and m not in ("pyrovisor.lab.cli", "pyrovisor.lab.registry")))
    assert heavy == []
