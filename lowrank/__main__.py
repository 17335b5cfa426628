"""``python -m lowrank`` runs the same command line as ``lowrank``."""

import sys

from lowrank.cli import main

sys.exit(main())
