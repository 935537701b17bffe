"""`python -m fitserve ...` runs the `fitserve` command line."""

import sys

from fitserve.server.cli import main

sys.exit(main())
