"""Keys, trust and sessions: who a peer is and how two peers agree on keys."""
