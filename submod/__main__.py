"""``python -m submod`` runs the ``submod`` command."""

import sys

from .cli import main

sys.exit(main())
