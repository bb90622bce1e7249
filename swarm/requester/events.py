"""The decisions this peer took as requester, as a bounded feed that pages subscribe to.

``DecisionFeed`` keeps the last ``FEED_SIZE`` classify calls, decided or not, each with a
thumbnail of the input the swarm was asked about; ``RecordedClassifier`` wraps a
requester so that every call it finishes (a decision or a ``NoDecisionError``) is
published once. Subscribers (the page's live stream) each get a bounded queue: one that
falls ``SUBSCRIBER_QUEUE`` entries behind is ended rather than allowed to grow memory,
and reconnects to a fresh snapshot.

Everything runs on the event loop; publishing costs a copy of 784 pixels, and the JSON
(and the PNG thumbnail) of an entry is built once, when first read.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import io
import itertools
import time
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from swarm import config
from swarm.decision import voting
from swarm.errors import ConfigError, NoDecisionError
from swarm.log import get_logger
from swarm.requester.call import DEFAULT_POLICY, ClassifyResult, Policy

log = get_logger(__name__)

FEED_SIZE: Final = 50  # decisions kept for a page that connects later
MAX_SUBSCRIBERS: Final = 16  # live streams at once; each costs a queue and a task
SUBSCRIBER_QUEUE: Final = 64  # entries a subscriber may fall behind before it is ended
_THUMBNAIL_MAX_SIDE: Final = 64  # a larger input is shown scaled down


@dataclasses.dataclass(slots=True)
class FeedEntry:
    """One classify call: its decision or its error, and the input it was about."""

    seq: int
    at: float  # unix time, seconds
    pixels: npt.NDArray[np.uint8] | None
    result: ClassifyResult | None = None
    error: NoDecisionError | None = None
    _doc: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry as the page reads it (built once)."""
        if self._doc is None:
            doc: dict[str, Any] = {
                "seq": self.seq,
                "at": round(self.at, 3),
                "thumbnail": _thumbnail(self.pixels),
            }
            if self.result is not None:
                doc |= {"kind": "decision", **decision_json(self.result)}
            elif self.error is not None:
                doc |= {"kind": "error", **error_json(self.error)}
            self._doc = doc
        return self._doc


def decision_json(result: ClassifyResult, image: str | None = None) -> dict[str, Any]:
    """``result.to_json`` plus what a viewer needs: the request id, each reply's weight
    and whether its top-1 dissented from the decision."""
    doc = result.to_json(image=image)
    doc["request_id"] = result.request_id
    for reply, info in zip(doc["replies"], result.replies, strict=True):
        reply["weight"] = round(info.weight, 4)
        reply["dissent"] = voting.top_class(info.topk) != result.label
    return doc


def error_json(error: NoDecisionError, image: str | None = None) -> dict[str, Any]:
    """A call that reached no decision: why, and what became of the peers asked."""
    return {
        "image": image,
        "error": str(error),
        "rejected": [{"peer": peer, "reason": reason} for peer, reason in error.rejected],
        "missing": list(error.missing),
    }


def _pixels(tensor: npt.NDArray[Any]) -> npt.NDArray[np.uint8] | None:
    """A copy of an input as 8-bit grey (H x W) or RGB (H x W x 3), from uint8 pixels or
    pixel / 255, C x H x W; None if it is not an image."""
    arr = np.squeeze(np.asarray(tensor))
    if arr.ndim == 3 and arr.shape[0] == 3:  # RGB, channels first
        arr = np.moveaxis(arr, 0, -1)
    elif arr.ndim != 2 or arr.size == 0:  # a grey image has two axes
        return None
    if arr.dtype == np.uint8:
        return np.array(arr, dtype=np.uint8)
    scaled = np.clip(np.nan_to_num(arr.astype(np.float32)) * 255.0 + 0.5, 0, 255)
    return np.asarray(scaled, dtype=np.uint8)


def _thumbnail(pixels: npt.NDArray[np.uint8] | None) -> str | None:
    if pixels is None:
        return None
    image = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
    if max(image.size) > _THUMBNAIL_MAX_SIDE:
        image.thumbnail((_THUMBNAIL_MAX_SIDE, _THUMBNAIL_MAX_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Subscription:
    """One subscriber's queue of entries; ``ended`` once the feed dropped it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: collections.deque[FeedEntry] = collections.deque()
        self._wake = asyncio.Event()
        self.ended = False

    def _push(self, entry: FeedEntry) -> bool:
        if len(self._items) >= self._limit:
            self._end()
            return False
        self._items.append(entry)
        self._wake.set()
        return True

    def _end(self) -> None:
        self.ended = True
        self._items.clear()
        self._wake.set()

    async def next_batch(self, timeout_s: float) -> list[FeedEntry]:
        """The entries published since the last call, waiting up to ``timeout_s`` for one;
        empty after the timeout or once ended."""
        if not self._items and not self.ended:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
        self._wake.clear()
        items = list(self._items)
        self._items.clear()
        return items


class FeedFullError(ConfigError):
    """The feed serves ``MAX_SUBSCRIBERS`` subscribers already."""


class DecisionFeed:
    """The last classify calls of one requester, and their live subscribers."""

    def __init__(
        self,
        *,
        size: int = FEED_SIZE,
        max_subscribers: int = MAX_SUBSCRIBERS,
        queue: int = SUBSCRIBER_QUEUE,
    ) -> None:
        if size < 1 or max_subscribers < 1 or queue < 1:
            raise ConfigError("a decision feed needs size, subscribers and queue >= 1")
        self._entries: collections.deque[FeedEntry] = collections.deque(maxlen=size)
        self._subscribers: list[Subscription] = []
        self._max_subscribers = max_subscribers
        self._queue = queue
        self._seq = itertools.count(1)
        self.decided_count = 0
        self.failed_count = 0

    def __repr__(self) -> str:
        return f"<DecisionFeed entries={len(self._entries)} subscribers={len(self._subscribers)}>"

    def __len__(self) -> int:
        return len(self._entries)

    def recent(self) -> list[FeedEntry]:
        """The entries kept, oldest first."""
        return list(self._entries)

    def decided(self, tensor: npt.NDArray[Any], result: ClassifyResult) -> FeedEntry:
        """Publish a decision about ``tensor``."""
        self.decided_count += 1
        return self._publish(FeedEntry(next(self._seq), time.time(), _pixels(tensor), result))

    def failed(self, tensor: npt.NDArray[Any], error: NoDecisionError) -> FeedEntry:
        """Publish a call about ``tensor`` that reached no decision."""
        self.failed_count += 1
        entry = FeedEntry(next(self._seq), time.time(), _pixels(tensor), error=error)
        return self._publish(entry)

    def subscribe(self) -> Subscription:
        """A new subscriber; FeedFullError when ``max_subscribers`` are connected."""
        self._subscribers = [s for s in self._subscribers if not s.ended]
        if len(self._subscribers) >= self._max_subscribers:
            raise FeedFullError(
                f"{self._max_subscribers} live views are open on this peer already; "
                "close one or retry later"
            )
        sub = Subscription(self._queue)
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to ``sub``; idempotent."""
        sub._end()  # the feed owns its subscriptions' state
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    def close(self) -> None:
        """End every subscription (the peer is stopping)."""
        for sub in self._subscribers:
            sub._end()
        self._subscribers.clear()

    def _publish(self, entry: FeedEntry) -> FeedEntry:
        self._entries.append(entry)
        for sub in list(self._subscribers):
            if not sub._push(entry):
                self._subscribers.remove(sub)
                log.info("feed_subscriber_lagged", queue=self._queue)
        return entry


class _Classify(Protocol):
    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    async def classify(
        self,
        tensor: npt.NDArray[Any],
        *,
        rule: str = ...,
        k: int = ...,
        policy: Policy = ...,
        deadline_ms: int | None = ...,
        quorum: int = ...,
    ) -> ClassifyResult: ...


class RecordedClassifier:
    """A requester whose every finished call is published to a ``DecisionFeed``: its
    decision, or the ``NoDecisionError`` it raised (bad parameters and cancellations
    are not calls the swarm answered, and are not published)."""

    __slots__ = ("feed", "inner")

    def __init__(self, inner: _Classify, feed: DecisionFeed) -> None:
        self.inner = inner
        self.feed = feed

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.inner.input_shape

    async def classify(
        self,
        tensor: npt.NDArray[Any],
        *,
        rule: str = voting.DEFAULT_RULE,
        k: int = config.DEFAULT_TOP_K,
        policy: Policy = DEFAULT_POLICY,
        deadline_ms: int | None = None,
        quorum: int = 1,
    ) -> ClassifyResult:
        """``inner.classify``, published to the feed."""
        try:
            result = await self.inner.classify(
                tensor, rule=rule, k=k, policy=policy, deadline_ms=deadline_ms, quorum=quorum
            )
        except NoDecisionError as exc:
            self.feed.failed(tensor, exc)
            raise
        self.feed.decided(tensor, result)
        return result
