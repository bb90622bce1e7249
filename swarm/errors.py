"""The exception tree of the swarm runtime.

One root, ``SwarmError``, with a category per kind of failure beneath it. Errors from
aiohttp, zeroconf, onnxruntime and cryptography are translated into these where they
enter our code (``raise ... from exc``), so callers handle our categories only.
Every message says what is wrong and, where it can, what to do.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Root of every error the swarm raises on purpose."""


class ConfigError(SwarmError):
    """A flag, file or setting is wrong; the message says which and how to fix it."""


class TransportError(SwarmError):
    """A peer could not be reached or did not answer in time."""


class PeerUnreachableError(TransportError):
    """Connecting to or talking with a peer failed (refused, reset, DNS, HTTP error)."""


class PeerTimeoutError(TransportError):
    """A peer did not answer within its deadline."""


class DiscoveryTimeoutError(TransportError):
    """The peers a caller waited for did not show up on mDNS in time."""


class ProtocolError(SwarmError):
    """A message from a peer or a client is malformed or violates the protocol."""


class DecodeError(ProtocolError):
    """Bytes could not be decoded into a well-formed message (bad JSON, shape, size...)."""


class MessageTooLargeError(DecodeError):
    """A body exceeds its size limit."""


class VerificationError(ProtocolError):
    """A message is well-formed but fails a check: signature, key, binding, freshness."""

    def __init__(self, reason: str, detail: str = "") -> None:
        # ``reason`` is a short stable token (e.g. "bad_signature") that is reported in
        # decisions and metrics; ``detail`` is for people.
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InferenceError(SwarmError):
    """The local model could not be loaded or run."""


class NoDecisionError(SwarmError):
    """A classify call could not reach a decision (no peers, quorum not met, deadline).

    ``rejected`` ((peer id, reason token) pairs) and ``missing`` (peer ids) say what became
    of the peers asked, when any were, so a caller can report them beside the message.
    """

    def __init__(
        self,
        message: str,
        *,
        rejected: tuple[tuple[str, str], ...] = (),
        missing: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.rejected = rejected
        self.missing = missing
