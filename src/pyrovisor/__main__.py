"""`python -m pyrovisor` runs the command line."""

import sys

from pyrovisor.api.cli import main

sys.exit(main())
