"""`python -m server ...` runs the `fitserve` command line."""

import sys

from server.cli import main

sys.exit(main())
