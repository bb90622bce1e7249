"""Keys, peer ids and the allow-list of keys this peer trusts.

Every peer holds one Ed25519 key pair (RFC 8032). The public key travels as its 32 raw
bytes, and as standard base64 of those bytes in text (TXT records, JSON). A peer id is
derived from the public key, so nobody can claim an id without holding its key:
``peer_id_for(key) == sha256(key).hexdigest()[:20]`` (80 bits: ids are names in logs and
tables; the security rests on the signatures, which always carry the full key).

The private key is stored as an unencrypted PKCS8 PEM file, ``<data_dir>/identity.key``,
readable by its owner only (like an SSH host key). It is created atomically: a fresh key
is written to a temporary file and hard-linked into place, so two processes starting on
the same directory end up with the same identity and a crash never leaves half a key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.errors import ConfigError, DecodeError
from swarm.log import get_logger

log = get_logger(__name__)

KEY_FILE_NAME: Final = "identity.key"
PUBLIC_KEY_LEN: Final = 32  # RFC 8032 section 5.1.5
SIGNATURE_LEN: Final = 64  # RFC 8032 section 5.1.6
SEED_LEN: Final = 32
PEER_ID_LEN: Final = 20  # hex characters of sha256(public key)
# Base64 of 32 bytes: 44 characters, one '=' of padding.
PUBLIC_KEY_B64_LEN: Final = 44
# Parsed public keys kept for reuse: enough for every peer and requester of a busy swarm;
# past it the least recently used is parsed again, so hostile keys cannot grow it.
_KEY_CACHE_SIZE: Final = 1024


def peer_id_for(public_key: bytes) -> str:
    """The peer id of ``public_key``: the first 20 hex characters of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:PEER_ID_LEN]


def encode_public_key(public_key: bytes) -> str:
    """Standard base64 of the 32 raw key bytes, as keys appear in TXT records and JSON."""
    return base64.b64encode(public_key).decode("ascii")


def decode_public_key(text: str) -> bytes:
    """The 32 raw bytes of a base64 public key; ``DecodeError`` if it is not one.

    Only the canonical encoding is accepted (the one ``encode_public_key`` writes), so a
    key has exactly one spelling and can be compared as text.
    """
    if not isinstance(text, str) or len(text) != PUBLIC_KEY_B64_LEN or not text.isascii():
        raise DecodeError(
            f"a public key must be {PUBLIC_KEY_B64_LEN} characters of standard base64 "
            f"(32 bytes), got {_brief(text)}"
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"a public key must be standard base64, got {_brief(text)}") from exc
    if len(raw) != PUBLIC_KEY_LEN or encode_public_key(raw) != text:
        raise DecodeError(f"not the canonical base64 of a 32-byte key: {_brief(text)}")
    return raw


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s Ed25519 signature of ``data``.

    Never raises: malformed keys, signatures of the wrong length and wrong types are
    simply not valid signatures.
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_LEN:
        return False
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LEN:
        return False
    try:
        _parsed_key(public_key).verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=_KEY_CACHE_SIZE)
def _parsed_key(raw: bytes) -> Ed25519PublicKey:
    # Parsing costs about 1% of a verify; the same few keys sign nearly every message.
    # A key that fails to parse raises, and lru_cache does not keep failures.
    return Ed25519PublicKey.from_public_bytes(raw)


class Identity:
    """This peer's Ed25519 key pair and the id derived from it."""

    __slots__ = ("_peer_id", "_private_key", "_public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id = peer_id_for(self._public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity kept in memory only (tests, one-shot requesters)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity of a 32-byte RFC 8032 seed: reproducible keys for the simulator."""
        if len(seed) != SEED_LEN:
            raise ValueError(f"an Ed25519 seed is {SEED_LEN} bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        """Load ``data_dir/identity.key``, creating the directory and the key if needed."""
        path = data_dir / KEY_FILE_NAME
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the data directory {data_dir}: {exc.strerror}; "
                "choose a directory this user can write"
            ) from exc
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            return cls._create(path)
        except OSError as exc:
            raise ConfigError(
                f"cannot read the identity key {path}: {exc.strerror}; make it readable "
                "by this user, or move it away to start with a new identity"
            ) from exc
        _warn_if_exposed(path)
        return cls._from_pem(pem, path)

    @classmethod
    def _from_pem(cls, pem: bytes, path: Path) -> Identity:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(
                f"the identity key {path} is not an unencrypted PKCS8 PEM private key "
                f"({exc}); restore it from a backup, or move it away to create a new "
                "identity (peers that allow-list the old key must then be given the new one)"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(
                f"the identity key {path} holds a {type(key).__name__}, not an Ed25519 key; "
                "move it away to create a new identity"
            )
        return cls(key)

    @classmethod
    def _create(cls, path: Path) -> Identity:
        identity = cls.generate()
        pem = identity._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            # mkstemp creates the file with mode 0600 before any byte is written.
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".identity.", suffix=".tmp")
        except OSError as exc:
            raise ConfigError(
                f"cannot create the identity key in {path.parent}: {exc.strerror}; "
                "choose a directory this user can write"
            ) from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                # link() fails if the key appeared meanwhile: never overwrite a key.
                os.link(tmp, path)
            except FileExistsError:
                log.info("identity_created_concurrently", path=str(path))
                return cls._from_pem(path.read_bytes(), path)
            except OSError:
                # Some filesystems have no hard links; replace() is still atomic.
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the identity key {path}: {exc.strerror}; "
                "choose a directory this user can write"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
        log.info("identity_created", path=str(path), peer_id=identity.peer_id)
        return identity

    @property
    def public_key(self) -> bytes:
        """The 32 raw bytes of the public key."""
        return self._public_key

    @property
    def public_key_b64(self) -> str:
        """The public key as standard base64, as it is announced and allow-listed."""
        return encode_public_key(self._public_key)

    @property
    def peer_id(self) -> str:
        """This peer's id, derived from its public key."""
        return self._peer_id

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id!r})"


class TrustStore:
    """The public keys this peer accepts requests and replies from.

    An open store accepts every well-formed key (a swarm on a trusted network); a closed
    one accepts exactly the keys of an allow-list file.
    """

    __slots__ = ("_keys", "_labels", "_source")

    def __init__(
        self,
        keys: Iterable[bytes] | None,
        *,
        labels: Mapping[bytes, str] | None = None,
        source: Path | None = None,
    ) -> None:
        self._keys = None if keys is None else frozenset(keys)
        self._labels = dict(labels or {})
        self._source = source

    @classmethod
    def open(cls) -> TrustStore:
        """A store that accepts any key."""
        return cls(None)

    @classmethod
    def from_keys(cls, keys: Iterable[bytes]) -> TrustStore:
        """A closed store of exactly ``keys`` (32 raw bytes each)."""
        listed = list(keys)
        for key in listed:
            if len(key) != PUBLIC_KEY_LEN:
                raise ValueError(f"a public key is {PUBLIC_KEY_LEN} bytes, got {len(key)}")
        return cls(listed)

    @classmethod
    def from_file(cls, path: Path) -> TrustStore:
        """Read an allow-list: one base64 public key per line, then an optional label.

        Blank lines and lines starting with ``#`` are ignored.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read the allow-list {path}: {exc}; give a readable UTF-8 file "
                "with one base64 public key per line"
            ) from exc
        keys: list[bytes] = []
        labels: dict[bytes, str] = {}
        for lineno, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            key_text, *rest = stripped.split(maxsplit=1)
            try:
                key = decode_public_key(key_text)
            except DecodeError as exc:
                raise ConfigError(
                    f"{path}:{lineno}: {exc}; each line must be a public key as peers "
                    "announce it (44 characters of base64), optionally followed by "
                    "whitespace and a label"
                ) from exc
            keys.append(key)
            if rest:
                labels[key] = rest[0]
        if not keys:
            log.warning("allow_list_empty", path=str(path))
        return cls(keys, labels=labels, source=path)

    @property
    def is_open(self) -> bool:
        """True if every key is accepted."""
        return self._keys is None

    def allows(self, public_key: bytes) -> bool:
        """True if requests and replies signed by ``public_key`` are accepted."""
        if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_LEN:
            return False
        return self._keys is None or public_key in self._keys

    def label(self, public_key: bytes) -> str | None:
        """The label the allow-list gives ``public_key``, if any."""
        return self._labels.get(public_key)

    def __len__(self) -> int:
        return 0 if self._keys is None else len(self._keys)

    def __repr__(self) -> str:
        if self._keys is None:
            return "TrustStore(open)"
        return f"TrustStore(keys={len(self._keys)}, source={self._source})"


def _warn_if_exposed(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("identity_key_exposed", path=str(path), mode=oct(stat.S_IMODE(mode)))


def _fsync_dir(directory: Path) -> None:
    # Makes the new directory entry durable; not every platform allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _brief(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
