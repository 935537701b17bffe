"""`python -m fitserve.server ...` runs the `fitserve` command line (the same as `python -m fitserve`)."""

import sys

from fitserve.server.cli import main

sys.exit(main())
