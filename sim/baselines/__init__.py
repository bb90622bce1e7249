"""The rivals of variant parallelism, run as swarms of real processes for comparison:
model parallelism (the reference cut into stages) and class parallelism (sensAI's pruned
per-group sub-models). Simulator code only; nothing here runs in the swarm's runtime."""
