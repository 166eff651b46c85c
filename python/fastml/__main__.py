"""``python -m fastml`` runs the command line."""

import sys

from fastml.cli import main

sys.exit(main())
