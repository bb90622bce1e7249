"""Command-line entry points: ``python -m swarm.peer`` and ``python -m swarm.classify``."""
