"""Announcements for the discovery and peer-table tests."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from swarm import config
from swarm.discovery.table import Announcement


def new_key() -> bytes:
    return os.urandom(32)


def pid(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:20]


def announcement(swarm: str = "s1", *, key: bytes | None = None, **kw: Any) -> Announcement:
    """A serving peer's announcement with a fresh key, overridable field by field."""
    key = key if key is not None else new_key()
    fields: dict[str, Any] = {
        "swarm": swarm,
        "peer_id": pid(key),
        "public_key": key,
        "role": "peer",
        "port": 8080,
        "variant": "T1",
        "model_sha256": "ab" * 32,
        "macs": 7840,
        "accuracy": 0.81,
        "family": "fa" * 16,
    }
    fields.update(kw)
    return Announcement(**fields)


def service(peer_id: str) -> str:
    return f"{peer_id}.{config.SERVICE_TYPE}"
