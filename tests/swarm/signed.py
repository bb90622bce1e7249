"""Constants of the signed-message fixtures (the fixtures live in conftest.py)."""

from __future__ import annotations

NOW = 1_700_000_000_000  # unix ms at which the fixture request is issued
MODEL_SHA = "ab" * 32
