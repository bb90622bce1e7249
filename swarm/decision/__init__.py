"""Deciding: the robust vote with its certificate, and peer reputation."""
