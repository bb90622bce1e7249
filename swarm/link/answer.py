"""How a peer answers a group of asks: run its variant on each input, sign the replies.

Transport-neutral: the WebSocket link, the in-memory link and any later transport call
the same ``Answerer``, once the link proved who the requester is. An ask that cannot be
served (its deadline passed, the model failed) gets an ``ItemError``; nothing raises.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from swarm.crypto.identity import Identity
from swarm.errors import InferenceError
from swarm.inference.manifest import ModelSpec
from swarm.log import get_logger
from swarm.wire import codec
from swarm.wire.messages import Ask, InferReply, InferRequest, ItemError, ReplyBatch, input_sha256

log = get_logger(__name__)

DEADLINE_EXCEEDED: Final = "deadline_exceeded"
INFERENCE_FAILED: Final = "inference_failed"


class Result(Protocol):
    @property
    def probs(self) -> npt.NDArray[np.float32]: ...

    @property
    def seconds(self) -> float: ...


class LocalModel(Protocol):
    """The model a peer serves (``inference.engine.Engine`` is one)."""

    @property
    def spec(self) -> ModelSpec: ...

    async def infer(self, x: npt.NDArray[np.float32]) -> Result: ...


class Answerer:
    """One peer's answers: ``answer`` runs the model on each ask of a group (together,
    so the engine batches them) and signs the group's replies once."""

    def __init__(
        self,
        identity: Identity,
        model: LocalModel,
        *,
        swarm: str,
        family: str,
        input_shape: tuple[int, int, int],
    ) -> None:
        self.identity = identity
        self.model = model
        self.swarm = swarm
        self.family = family
        self.input_shape = input_shape
        self.input_len = math.prod(input_shape)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def answer(self, requester_id: str, asks: Sequence[Ask]) -> ReplyBatch:
        """The signed answers to ``asks`` from ``requester_id``, in order."""
        if len(asks) == 1:
            items: list[InferReply | ItemError] = [await self.answer_one(requester_id, asks[0])]
        else:
            items = list(await asyncio.gather(*(self.answer_one(requester_id, a) for a in asks)))
        return self.sign(items)

    def sign(self, items: Sequence[InferReply | ItemError]) -> ReplyBatch:
        """One signature over the replies among ``items``."""
        return codec.sign_replies(self.identity, items)

    def request_of(self, requester_id: str, ask: Ask) -> InferRequest:
        """``ask`` as the request it stands for, on this peer's link from ``requester_id``."""
        return InferRequest(
            swarm=self.swarm,
            family=self.family,
            request_id=ask.request_id,
            requester_id=requester_id,
            input=ask.input,
            input_shape=self.input_shape,
            input_sha256=input_sha256(ask.input),
            k=ask.k,
            deadline_ms=ask.deadline_ms,
        )

    async def answer_one(self, requester_id: str, ask: Ask) -> InferReply | ItemError:
        """One ask's reply (unsigned: its batch is signed), or why it has none."""
        request = self.request_of(requester_id, ask)
        model = self.model
        # The requester's budget counts from receipt: clocks of two devices may differ.
        try:
            async with asyncio.timeout(ask.deadline_ms / 1000):
                result = await model.infer(request.tensor())
        except TimeoutError:
            return ItemError(
                ask.request_id,
                DEADLINE_EXCEEDED,
                f"the model did not answer within {ask.deadline_ms} ms",
            )
        except InferenceError as exc:
            log.warning("infer_failed", error=str(exc), request=ask.request_id)
            return ItemError(ask.request_id, INFERENCE_FAILED, str(exc)[: codec.MAX_ERROR_TEXT])
        spec = model.spec
        return codec.build_reply(
            request,
            responder_id=self.identity.peer_id,
            variant=spec.name,
            model_sha256=spec.sha256,
            probs=result.probs,
            infer_us=round(result.seconds * 1_000_000),
        )
