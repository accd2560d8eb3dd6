"""`python -m memupdate.cli` runs the `memupdate` command."""

import sys

from memupdate.cli import main

sys.exit(main())
