"""``python -m pnnh`` (and ``torchrun -m pnnh``) run the command line."""

import sys

from pnnh.cli import main

sys.exit(main())
