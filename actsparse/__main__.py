"""``python -m actsparse`` runs the command line (also under ``torchrun -m actsparse``)."""

import sys

from .cli import main

sys.exit(main())
