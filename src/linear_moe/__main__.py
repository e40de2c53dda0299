"""`python -m linear_moe ...` is `linear-moe ...`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
