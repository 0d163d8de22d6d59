"""Build hook: compile the freestanding guests with the system gcc before packaging them."""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
GUEST_OUT = ROOT / "src" / "pyrovisor" / "_guests"


class BuildPyWithGuests(build_py):
    """Run `make -C guests` so the guest ELFs ship as package data (editable installs included)."""

    def run(self) -> None:
        subprocess.run(["make", "-C", str(ROOT / "guests"), f"OUT={GUEST_OUT}", f"PYTHON={sys.executable}"], check=True)
        super().run()


setup(cmdclass={"build_py": BuildPyWithGuests})
