"""``python -m controlnet.cli``: the command line, as ``python -m controlnet``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
