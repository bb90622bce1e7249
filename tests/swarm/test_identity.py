"""Tests of keys, peer ids, key files and allow-lists."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from swarm.crypto.identity import (
    KEY_FILE_NAME,
    Identity,
    TrustStore,
    decode_public_key,
    encode_public_key,
    peer_id_for,
    verify_signature,
)
from swarm.errors import ConfigError, DecodeError


def _pem(key: Ed25519PrivateKey | Ed448PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_peer_id_is_sha256_prefix_of_public_key() -> None:
    """A peer id is the first 20 hex characters of sha256(raw public key)."""
    identity = Identity.generate()
    assert len(identity.public_key) == 32
    assert identity.peer_id == hashlib.sha256(identity.public_key).hexdigest()[:20]
    assert identity.peer_id == peer_id_for(identity.public_key)


def test_public_key_b64_is_standard_base64_of_raw_key() -> None:
    """The text form of a key is standard base64 of its 32 raw bytes, and decodes back."""
    identity = Identity.generate()
    assert base64.b64decode(identity.public_key_b64) == identity.public_key
    assert decode_public_key(identity.public_key_b64) == identity.public_key
    assert encode_public_key(identity.public_key) == identity.public_key_b64


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64 at all, and long enough to be 44!",
        base64.b64encode(b"\x01" * 31).decode() + "AAAA",  # 35 bytes of base64 text
        base64.b64encode(b"\x01" * 33).decode(),
        base64.b64encode(b"\x01" * 32).decode()[:-2] + "B=",  # non-canonical trailing bits
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),
    ],
)
def test_decode_public_key_rejects_malformed_text(text: str) -> None:
    """Anything but the canonical base64 of 32 bytes is refused with DecodeError."""
    with pytest.raises(DecodeError):
        decode_public_key(text)


def test_sign_then_verify_roundtrip() -> None:
    """A signature verifies for the signer's key and the signed data only."""
    alice, bob = Identity.generate(), Identity.generate()
    signature = alice.sign(b"payload")
    assert len(signature) == 64
    assert verify_signature(alice.public_key, signature, b"payload")
    assert not verify_signature(alice.public_key, signature, b"payload!")
    assert not verify_signature(bob.public_key, signature, b"payload")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify_signature(alice.public_key, flipped, b"payload")


@pytest.mark.parametrize(
    ("key", "signature", "data"),
    [
        (b"", b"", b""),
        (b"\x00" * 31, b"\x00" * 64, b"x"),
        (b"\x00" * 32, b"\x00" * 63, b"x"),
        ("text-key", b"\x00" * 64, b"x"),
        (b"\x00" * 32, None, b"x"),
        (b"\x00" * 32, b"\x00" * 64, None),
    ],
)
def test_verify_signature_never_raises(key: object, signature: object, data: object) -> None:
    """Malformed keys, signatures and data are 'not valid', never an exception."""
    assert verify_signature(key, signature, data) is False  # type: ignore[arg-type]


def test_from_seed_is_deterministic() -> None:
    """The same 32-byte seed gives the same identity; other lengths are refused."""
    assert Identity.from_seed(b"\x07" * 32).peer_id == Identity.from_seed(b"\x07" * 32).peer_id
    assert Identity.from_seed(b"\x07" * 32).peer_id != Identity.from_seed(b"\x08" * 32).peer_id
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.from_seed(b"short")


def test_load_or_create_creates_private_key_file_and_directory(tmp_path: Path) -> None:
    """A missing key is created as PKCS8 PEM, mode 0600, in a directory made 0700."""
    data_dir = tmp_path / "peer" / "data"
    identity = Identity.load_or_create(data_dir)
    key_file = data_dir / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILE_NAME]  # no temporary left
    assert Identity.load_or_create(data_dir).peer_id == identity.peer_id


def test_load_or_create_logs_creation(tmp_path: Path) -> None:
    """Creating a key logs identity_created with the new peer id."""
    with capture_logs() as logs:
        identity = Identity.load_or_create(tmp_path)
    assert {"event": "identity_created", "peer_id": identity.peer_id}.items() <= logs[0].items()


def test_load_or_create_loads_existing_key(tmp_path: Path) -> None:
    """An existing key file is used as is, not replaced."""
    key = Ed25519PrivateKey.generate()
    (tmp_path / KEY_FILE_NAME).write_bytes(_pem(key))
    os.chmod(tmp_path / KEY_FILE_NAME, 0o600)
    assert Identity.load_or_create(tmp_path).public_key == Identity(key).public_key


def test_load_or_create_keeps_key_created_concurrently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another process creates the key first, its key wins and ours is discarded."""
    other = Ed25519PrivateKey.generate()
    real_link = os.link

    def racing_link(src: str, dst: str) -> None:
        Path(dst).write_bytes(_pem(other))  # the other process got there first
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    identity = Identity.load_or_create(tmp_path)
    assert identity.public_key == Identity(other).public_key
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE_NAME]


@pytest.mark.parametrize(
    "content",
    [
        b"garbage",
        b"",
        _pem(Ed448PrivateKey.generate()),
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    ],
    ids=["garbage", "empty", "ed448", "encrypted"],
)
def test_load_or_create_rejects_unusable_key_file(tmp_path: Path, content: bytes) -> None:
    """A corrupt, foreign or encrypted key file raises ConfigError naming it and the fix."""
    (tmp_path / KEY_FILE_NAME).write_bytes(content)
    with pytest.raises(ConfigError, match=r"identity\.key") as info:
        Identity.load_or_create(tmp_path)
    assert "move it away" in str(info.value)
    assert (tmp_path / KEY_FILE_NAME).read_bytes() == content  # never overwritten


def test_load_or_create_rejects_data_dir_that_is_a_file(tmp_path: Path) -> None:
    """A data directory that cannot be created raises ConfigError naming it."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="data directory"):
        Identity.load_or_create(blocker / "sub")


def test_load_or_create_warns_when_key_is_readable_by_others(tmp_path: Path) -> None:
    """A key file readable by group or others still loads, with a warning event."""
    Identity.load_or_create(tmp_path)
    os.chmod(tmp_path / KEY_FILE_NAME, 0o644)
    with capture_logs() as logs:
        Identity.load_or_create(tmp_path)
    assert [e["event"] for e in logs] == ["identity_key_exposed"]


def test_repr_does_not_show_the_private_key() -> None:
    """repr(Identity) names the peer id only."""
    identity = Identity.generate()
    assert repr(identity) == f"Identity(peer_id={identity.peer_id!r})"


def test_open_trust_store_accepts_any_well_formed_key() -> None:
    """An open store allows every 32-byte key and nothing else."""
    store = TrustStore.open()
    assert store.is_open
    assert store.allows(Identity.generate().public_key)
    assert not store.allows(b"\x00" * 31)


def test_trust_store_from_file_reads_keys_comments_and_labels(tmp_path: Path) -> None:
    """An allow-list takes one key per line, skips comments and blanks, keeps labels."""
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    path = tmp_path / "allow.txt"
    path.write_text(
        f"# swarm members\n\n{alice.public_key_b64}   kitchen pi\n"
        f"  {bob.public_key_b64}\n\t# {carol.public_key_b64}\n",
        encoding="utf-8",
    )
    store = TrustStore.from_file(path)
    assert not store.is_open
    assert len(store) == 2
    assert store.allows(alice.public_key)
    assert store.allows(bob.public_key)
    assert not store.allows(carol.public_key)
    assert store.label(alice.public_key) == "kitchen pi"
    assert store.label(bob.public_key) is None


def test_trust_store_bad_line_names_file_and_line(tmp_path: Path) -> None:
    """A malformed key raises ConfigError with file:line and what a line must hold."""
    path = tmp_path / "allow.txt"
    path.write_text(f"{Identity.generate().public_key_b64}\n# ok\nnot-a-key label\n")
    with pytest.raises(ConfigError, match=r"allow\.txt:3: .*44 characters of base64"):
        TrustStore.from_file(path)


def test_trust_store_missing_file_raises_config_error(tmp_path: Path) -> None:
    """An allow-list that cannot be read raises ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"missing\.txt"):
        TrustStore.from_file(tmp_path / "missing.txt")


def test_trust_store_empty_file_warns(tmp_path: Path) -> None:
    """An allow-list without keys is closed to everyone and says so in a warning."""
    path = tmp_path / "allow.txt"
    path.write_text("# nobody yet\n")
    with capture_logs() as logs:
        store = TrustStore.from_file(path)
    assert not store.allows(Identity.generate().public_key)
    assert logs[0]["event"] == "allow_list_empty"


def test_trust_store_from_keys_validates_length() -> None:
    """from_keys builds a closed store and refuses keys that are not 32 bytes."""
    key = Identity.generate().public_key
    assert TrustStore.from_keys([key]).allows(key)
    with pytest.raises(ValueError, match="32 bytes"):
        TrustStore.from_keys([b"short"])
