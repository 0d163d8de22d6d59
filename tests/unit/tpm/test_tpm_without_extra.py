"""Without the [tpm] extra: pyrovisor's TPM modules still import, and using the TPM says what to install."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.modules["tpm2_pytss"] = None  # as if not installed: every import of it raises ImportError
sys.modules["cryptography"] = None
import pyrovisor.api.attest_commands, pyrovisor.tpm.attestation, pyrovisor.tpm.commands
import pyrovisor.tpm.event_log, pyrovisor.tpm.swtpm
from pyrovisor.errors import MissingExtraError
from pyrovisor.tpm.commands import TpmCommands
try:
    TpmCommands(lambda command: b"")
except MissingExtraError as exc:
    print(exc)
"""

REGISTER = """
import argparse, sys
from pyrovisor.api import attest_commands
attest_commands.register(argparse.ArgumentParser().add_subparsers())
print(sorted(name for name in sys.modules if name.partition(".")[0] in ("tpm2_pytss", "cryptography")))
"""


def test_modules_import_and_commands_name_the_extra() -> None:
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("the vTPM needs tpm2-pytss, which is not installed: "
                                     "pip install 'pyrovisor[tpm]'")


def test_registering_the_commands_imports_nothing_heavy() -> None:
    result = subprocess.run([sys.executable, "-c", REGISTER], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
