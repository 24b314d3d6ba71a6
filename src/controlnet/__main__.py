"""``python -m controlnet``: the command line (also what torchrun launches: ``torchrun -m controlnet train``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
