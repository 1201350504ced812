"""``python -m histovi`` runs the command line (same as the ``histovi`` command)."""

import sys

from .cli import main

sys.exit(main())
