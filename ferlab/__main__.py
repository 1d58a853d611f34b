"""``python -m ferlab``: the command line (the ``ferlab`` script re-executes this with jemalloc preloaded)."""

import sys

from ferlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
