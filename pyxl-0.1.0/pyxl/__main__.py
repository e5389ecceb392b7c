"""``python -m pyxl``: the pyxl command line."""

import sys

from pyxl.cli.main import main

sys.exit(main())
