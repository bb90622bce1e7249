"""One runner per scenario kind: each starts its swarm, drives it, and returns a report."""
