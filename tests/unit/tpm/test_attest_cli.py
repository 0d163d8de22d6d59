"""`pyrovisor attest golden|quote|log|verify` through the parser, against a real swtpm and a stand-in API."""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from tpm_helpers import CMDLINE, INITRD, KERNEL, Booted, need_swtpm, need_tss

from pyrovisor.api import attest_commands
from pyrovisor.api.cli import CommandParser
from pyrovisor.errors import AttestationError, PyrovisorError


@pytest.fixture(autouse=True)
def _tools() -> None:
    need_swtpm()
    need_tss()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = CommandParser(prog="pyrovisor")
    subparsers = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
                      parser.add_subparsers(dest="command", metavar="COMMAND"))
    attest_commands.register(subparsers)
    args = parser.parse_args(argv)
    code = args.handler(args)
    return code, capsys.readouterr().out


def files(tmp_path: Path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "os.elf", tmp_path / "os.initrd"
    kernel.write_bytes(KERNEL)
    initrd.write_bytes(INITRD)
    return kernel, initrd


class _Handler(http.server.BaseHTTPRequestHandler):
    machine: Booted

    def do_POST(self) -> None:  # the VMM's POST /tpm/quote, as the lead's route answers it
        from pyrovisor.tpm.attestation import quote_document

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/tpm/quote"
        nonce, pcrs = bytes.fromhex(body["nonce"]), tuple(body["pcrs"])
        quote = self.machine.commands.quote(nonce, pcrs)
        answer = {"quote": quote_document(quote, self.machine.commands.read_pcrs(pcrs)),
                  "log": base64.b64encode(self.machine.log).decode(), "ak": self.machine.ak_pem.decode()}
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _UnixHttpServer(socketserver.UnixStreamServer):
    def get_request(self) -> tuple[Any, Any]:
        request, _ = super().get_request()
        return request, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port) client address


@pytest.fixture
def api(booted: Booted, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "api.sock"
    handler = type("Handler", (_Handler,), {"machine": booted})
    server = _UnixHttpServer(str(path), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.shutdown()
    server.server_close()


def test_golden_prints_or_writes_the_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel, initrd = files(tmp_path)
    code, out = run(["attest", "golden", str(kernel), str(initrd), CMDLINE.decode()], capsys)
    assert code == 0
    document = json.loads(out)
    assert document["format"] == "pyrovisor-golden/1" and set(document["measurements"]) == {"kernel", "initrd",
                                                                                             "cmdline"}
    code, out = run(["attest", "golden", str(kernel), "-", "quiet", "--out", str(tmp_path / "g.json")], capsys)
    assert code == 0 and "wrote" in out
    assert "initrd" not in json.loads((tmp_path / "g.json").read_text())["measurements"]
    code, out = run(["attest", "golden", str(kernel), "-", "quiet", "--out", str(tmp_path / "g.json"), "--json"],
                    capsys)
    assert json.loads(out) == json.loads((tmp_path / "g.json").read_text())


def test_quote_then_verify_then_log(api: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel, initrd = files(tmp_path)
    golden = tmp_path / "golden.json"
    run(["attest", "golden", str(kernel), str(initrd), CMDLINE.decode(), "--out", str(golden)], capsys)
    nonce = "00112233445566778899aabbccddeeff"
    quote, log, ak = tmp_path / "quote.json", tmp_path / "boot.log", tmp_path / "ak.pub"
    code, out = run(["attest", "quote", str(api), "--nonce", nonce, "--out", str(quote), "--log", str(log),
                     "--ak", str(ak), "--json"], capsys)
    assert code == 0
    written = json.loads(out)
    assert written["written"] == {"quote": str(quote), "log": str(log), "ak": str(ak)}
    assert written["pcrs"] == [8, 9] and set(written["pcr_values"]) == {"8", "9"}

    verify = ["attest", "verify", str(quote), "--log", str(log), "--ak", str(ak), "--expect", str(golden)]
    code, out = run([*verify, "--nonce", nonce, "--json"], capsys)
    assert code == 0 and json.loads(out)["ok"] is True
    code, out = run([*verify, "--nonce", nonce], capsys)
    assert code == 0 and out.splitlines()[-1] == "verified: every check passed"
    assert all(line.startswith("PASS") for line in out.splitlines()[:-1])

    code, out = run([*verify, "--nonce", "ff" * 16, "--json"], capsys)
    verdict = json.loads(out)
    assert code == 1 and verdict["ok"] is False
    assert [each["name"] for each in verdict["checks"] if not each["ok"]] == ["nonce"]
    code, out = run([*verify, "--nonce", "ff" * 16], capsys)
    assert code == 1 and "FAIL  nonce" in out and out.splitlines()[-1] == "NOT verified: nonce failed"

    code, out = run(["attest", "log", str(log), "--json"], capsys)
    document = json.loads(out)
    assert code == 0 and [event["data"] for event in document["events"]] == [
        "kernel os.elf\x00", "initrd os.initrd\x00", f"cmdline {CMDLINE.decode()}\x00"]
    assert document["pcrs"] == written["pcr_values"]  # the log replays to what the TPM reported
    code, out = run(["attest", "log", str(log)], capsys)
    assert code == 0 and "EV_IPL" in out and "kernel os.elf" in out


def test_quote_with_chosen_pcrs(api: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quote = tmp_path / "quote.json"
    code, out = run(["attest", "quote", str(api), "--nonce", "abcd", "--out", str(quote), "--pcrs", "9,8,16"],
                    capsys)
    assert code == 0 and json.loads(quote.read_text())["pcrs"] == [8, 9, 16]
    assert "PCR 16" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["attest", "quote", "x.sock", "--nonce", "zz", "--out", "q"], "invalid nonce 'zz'"),
    (["attest", "quote", "x.sock", "--nonce", "00" * 65, "--out", "q"], "1 to 64 bytes"),
    (["attest", "quote", "x.sock", "--nonce", "00", "--out", "q", "--pcrs", "8,x"], "invalid PCR list"),
    (["attest", "quote", "x.sock", "--nonce", "00", "--out", "q", "--pcrs", "8,24"], "invalid PCR list"),
    (["attest", "verify", "q.json", "--log", "l", "--ak", "a", "--expect", "g"], "--nonce"),
])
def test_bad_command_lines_are_one_line_usage_errors(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        run(argv, capsys)
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("pyrovisor: error: ") and message in error and error.count("\n") == 1


def test_errors_are_pyrovisor_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "quote.json").write_text("[]")
    with pytest.raises(AttestationError, match="not a pyrovisor-quote/1 document"):
        run(["attest", "verify", str(tmp_path / "quote.json"), "--log", "l", "--ak", "a", "--expect", "g",
             "--nonce", "00"], capsys)
    with pytest.raises(PyrovisorError, match="no VMM control socket"):
        run(["attest", "quote", str(tmp_path / "none.sock"), "--nonce", "00", "--out", str(tmp_path / "q")],
            capsys)
    (tmp_path / "bad.log").write_bytes(b"\x00" * 10)
    with pytest.raises(AttestationError, match="event log"):
        run(["attest", "log", str(tmp_path / "bad.log")], capsys)
