"""The pieces of ``python -m sim.bench``: processes, measurements, loads and counters."""
