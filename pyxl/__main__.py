"""``python -m pyxl``: the pyxl command line."""

import sys

from .cli import main

sys.exit(main())
