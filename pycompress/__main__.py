"""``python -m pycompress ...`` (also ``torchrun ... -m pycompress demo``): the command line."""

import sys

from pycompress.cli import main

if __name__ == "__main__":
    sys.exit(main())
