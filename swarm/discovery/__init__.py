"""Finding peers: mDNS/DNS-SD announcements and the live peer table."""
