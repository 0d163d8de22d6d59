"""Issue 16: the VMM installs and runs without numpy or matplotlib; only the lab (pyrovisor.lab) may use them."""

from __future__ import annotations

import json
import subprocess

from import_blocker import ATTEMPT, blocked_python

# In the blocked Python: every module of pyrovisor but the lab's, imported by name. They are found from the
# files, not with pkgutil.walk_packages, which passes over namespace packages (devices/virtio has no __init__.py)
# and imports every package it descends into (the lab's too). The lab's own modules are imported only where a
# VMM module imports them (the command line registers the lab's commands), and then they must do without numpy.
IMPORT_ALL = """
import importlib, json, pathlib, traceback
import pyrovisor

root = pathlib.Path(pyrovisor.__file__).parent
names, failures = [], []
for path in sorted(root.rglob("*.py")):
    parts = ["pyrovisor", *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    if not all(part.isidentifier() for part in parts) or parts[1:2] == ["lab"] or parts[-1] == "__main__":
        continue  # __main__ runs the command line when imported
    names.append(".".join(parts))
for name in names:
    try:
        importlib.import_module(name)
    except Exception:
        failures.append(name + ": " + traceback.format_exc(limit=-3))
heavy = sorted(name for name in sys.modules if name.partition(".")[0] in ("numpy", "matplotlib"))
print(json.dumps({"modules": names, "failures": failures, "heavy": heavy}))
"""


def test_every_vmm_module_imports_without_numpy_or_matplotlib() -> None:
    result = subprocess.run(blocked_python(IMPORT_ALL), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    attempts = [line for line in result.stderr.splitlines() if line.startswith(ATTEMPT)]
    assert attempts == [], "a VMM module imports numpy or matplotlib (see the failures):\n" + "\n".join(
        report["failures"] or attempts)
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["heavy"] == []
    modules = set(report["modules"])
    assert not any(name == "pyrovisor.lab" or name.startswith("pyrovisor.lab.") for name in modules)
    # The walk found the VMM, down to the modules that used numpy before issue 16.
    assert len(modules) > 100, sorted(modules)
    assert {"pyrovisor.vstate.dirty", "pyrovisor.migration.pages", "pyrovisor.snapshot.memory_file",
            "pyrovisor.devices.virtio.balloon", "pyrovisor.host.residency", "pyrovisor.api.cli"} <= modules


def test_the_blocker_blocks() -> None:
    """The test above means something only if the blocker refuses numpy and says so."""
    result = subprocess.run(blocked_python("import numpy\n"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr
    assert f"{ATTEMPT} numpy" in result.stderr
