"""Keys, trust and the links' handshake: who a peer is and how two peers agree on keys."""
