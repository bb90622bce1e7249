"""``python -m swarm.peer``: the entry point; the command lives in ``swarm.cli.peer``."""

import sys

from swarm.cli.peer import main

if __name__ == "__main__":
    sys.exit(main())
