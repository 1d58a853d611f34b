"""``python -m ferlab``: the command line (the ``ferlab`` script runs it with jemalloc preloaded, unless
FERLAB_JEMALLOC=0)."""

import sys

from ferlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
