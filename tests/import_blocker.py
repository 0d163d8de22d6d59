"""Python as on a host without numpy and matplotlib (issue 16): a meta-path finder, installed by `-c` code before
anything else is imported, makes every import of them fail and reports each attempt on stderr."""

from __future__ import annotations

import sys

BLOCKED = ("numpy", "matplotlib")
ATTEMPT = "blocked import:"  # on stderr, once per attempt (even one that the importer catches)

BLOCKER = f"""
import sys

class _NotInstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            sys.stderr.write("{ATTEMPT} " + name + "\\n")
            sys.stderr.flush()
            raise ModuleNotFoundError("No module named " + repr(name) + " (blocked by the test)", name=name)
        return None

_present = sorted(name for name in sys.modules if name.partition(".")[0] in {BLOCKED!r})
if _present:
    sys.exit("already imported before the blocker: " + ", ".join(_present))
sys.meta_path.insert(0, _NotInstalled())
del _present
"""

# The pyrovisor command (python -m pyrovisor) with numpy and matplotlib blocked: its arguments follow.
PYROVISOR = (sys.executable, "-c", BLOCKER + "from pyrovisor.api.cli import main\nsys.exit(main())\n")


def blocked_python(code: str) -> list[str]:
    """The command line of a Python that runs `code` with numpy and matplotlib blocked."""
    return [sys.executable, "-c", BLOCKER + code]
