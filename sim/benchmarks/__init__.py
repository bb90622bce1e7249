"""The pieces of ``python -m sim.bench``: processes, measurements, and legacy paths."""
