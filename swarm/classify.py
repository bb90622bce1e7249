"""``python -m swarm.classify``: the entry point; the command lives in ``swarm.cli.classify``."""

import sys

from swarm.cli.classify import main

if __name__ == "__main__":
    sys.exit(main())
