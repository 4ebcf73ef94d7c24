"""``python -m pnnh`` (and ``torchrun -m pnnh``) run the command line."""

from pnnh.cli import run

run()
