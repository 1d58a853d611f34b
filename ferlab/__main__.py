"""``python -m ferlab``: the command line (the ``ferlab`` script runs it, preloading jemalloc if FERLAB_JEMALLOC=1)."""

import sys

from ferlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
