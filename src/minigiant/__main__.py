"""``python -m minigiant``: the CLI, also for launchers that take a module (``torchrun -m minigiant distill ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
