"""Byzantine behaviours: how a malicious peer turns its honest signed reply into a lie.

Each attack takes the honest reply the peer's real model produced (an ``InferReply``,
already bound to the request) and returns what the malicious peer sends instead; the
group of replies is then signed by the peer (``Attacker.tamper_batch``). Two families:

- Lies the requester must *outvote*: validly signed, well-formed, bound to the request,
  but naming a wrong class. ``random`` (a uniformly random class), ``targeted`` (always
  one class), ``collude`` (every colluder names ``(honest top-1 + 1) % 10`` with
  probability 1.0, so colluders agree with each other on every input).
- Lies the requester must *reject*: ``inflate`` (probabilities summing past 1),
  ``replay`` (an old signed reply of this peer to another request), ``misbind`` (a fresh
  signature over a reply bound to another input), ``forge`` (signed with another key),
  ``claim`` (answers from a model other than the variant it announces; handled by the
  agent, which serves another engine, so the reply names the variant it really runs).

Attack code lives only in ``sim/``: nothing here is importable from ``swarm/``.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Final

from swarm import config
from swarm.crypto.identity import Identity
from swarm.wire import codec, verify
from swarm.wire.messages import PPM, InferReply, ItemError, ReplyBatch

HONEST: Final = "honest"
OUTVOTE_ATTACKS: Final = ("random", "targeted", "collude")
REJECT_ATTACKS: Final = ("inflate", "replay", "misbind", "forge", "claim")
ATTACKS: Final = OUTVOTE_ATTACKS + REJECT_ATTACKS
MODES: Final = (HONEST, *ATTACKS)
# What the requester's verify_reply must answer to each rejectable attack.
EXPECTED_REJECTION: Final = {
    "inflate": verify.BAD_TOPK,
    "replay": verify.WRONG_BINDING,
    "misbind": verify.WRONG_BINDING,
    "forge": verify.BAD_SIGNATURE,
    "claim": verify.WRONG_VARIANT,
}
DEFAULT_TARGET: Final = 0  # the targeted flip's class ("T-shirt/top" in Fashion-MNIST)
_MEMORY: Final = 64  # old replies a replaying peer keeps


def collude_class(honest_top1: int) -> int:
    """The class every colluder names: the same for all of them on a given input."""
    return (honest_top1 + 1) % config.NUM_CLASSES


def _rebuild(reply: InferReply, **changes: object) -> InferReply:
    """``reply`` with ``changes``, encoded anew (its batch's signature will cover it)."""
    fields: dict[str, object] = {
        f.name: getattr(reply, f.name) for f in dataclasses.fields(reply) if f.name != "raw"
    }
    fields.update(changes)
    return InferReply(**fields, raw=codec.encode_reply(**fields))  # type: ignore[arg-type]


class Attacker:
    """One malicious peer's state: its mode, its key, an impostor key and old replies."""

    def __init__(
        self,
        identity: Identity,
        *,
        mode: str = HONEST,
        target: int = DEFAULT_TARGET,
        seed: int = 0,
    ) -> None:
        self.identity = identity
        self.impostor = Identity.generate()  # the "other key" a forger signs with
        self.mode = HONEST
        self.target = target
        self.set_mode(mode, target)
        self._rng = random.Random(seed)
        self._old: collections.deque[InferReply] = collections.deque(maxlen=_MEMORY)
        self.lies = 0

    def __repr__(self) -> str:
        return f"<Attacker mode={self.mode} target={self.target} lies={self.lies}>"

    def set_mode(self, mode: str, target: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if target is not None:
            if not 0 <= target < config.NUM_CLASSES:
                raise ValueError(f"target must be a class in [0, {config.NUM_CLASSES - 1}]")
            self.target = target
        self.mode = mode

    def tamper(self, honest: InferReply) -> InferReply:  # noqa: PLR0911  # one return per attack reads best
        """What this peer sends instead of ``honest`` (``honest`` itself when honest)."""
        mode = self.mode
        old = self._old[0] if self._old else None
        self._old.append(honest)
        if mode in (HONEST, "claim"):
            return honest  # "claim" lies in the model it serves, not in the reply
        self.lies += 1
        top1 = honest.topk[0][0]
        if mode == "random":
            return _rebuild(honest, topk=((self._rng.randrange(config.NUM_CLASSES), PPM),))
        if mode == "targeted":
            return _rebuild(honest, topk=((self.target, PPM),))
        if mode == "collude":
            return _rebuild(honest, topk=((collude_class(top1), PPM),))
        if mode == "inflate":
            return _rebuild(honest, topk=((collude_class(top1), PPM), (top1, PPM)))
        if mode == "forge":
            return _rebuild(honest, topk=((collude_class(top1), PPM),))
        if mode == "replay":
            if old is None or old.request_id == honest.request_id:
                return _rebuild(honest, request_id="0" * 32)  # nothing to replay yet
            return old
        if mode == "misbind":
            other = "0" * 64 if old is None else old.input_sha256
            if other == honest.input_sha256:
                other = "f" * 64
            return _rebuild(honest, input_sha256=other, topk=((collude_class(top1), PPM),))
        raise AssertionError(mode)  # pragma: no cover - set_mode admits only MODES

    def tamper_batch(self, honest: ReplyBatch) -> ReplyBatch:
        """What this peer sends instead of the reply batch ``honest``: each reply tampered
        as alone, the batch signed by this peer (by the impostor key when forging)."""
        if self.mode in (HONEST, "claim"):
            for item in honest.items:
                if isinstance(item, InferReply):
                    self._old.append(item)
            return honest
        items = [i if isinstance(i, ItemError) else self.tamper(i) for i in honest.items]
        signer = self.impostor if self.mode == "forge" else self.identity
        lie = codec.sign_replies(signer, items)
        return dataclasses.replace(lie, responder_id=honest.responder_id)


__all__ = [
    "ATTACKS",
    "DEFAULT_TARGET",
    "EXPECTED_REJECTION",
    "HONEST",
    "MODES",
    "OUTVOTE_ATTACKS",
    "REJECT_ATTACKS",
    "Attacker",
    "collude_class",
]
