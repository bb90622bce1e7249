"""Constants of the message fixtures (the fixtures live in conftest.py)."""

from __future__ import annotations

NOW = 1_700_000_000_000  # unix ms at which the fixture reply is issued
FAMILY = "fa" * 16  # a family id
MODEL_SHA = "ab" * 32
