"""Asking the swarm: planning a call, fanning it out, deadlines, hedging, early exit."""
