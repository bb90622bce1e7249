"""Tests of swarm.requester.events: the bounded feed of decisions and its subscribers."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from swarm.errors import ConfigError, NoDecisionError
from swarm.requester.call import ClassifyResult, Policy
from swarm.requester.events import (
    DecisionFeed,
    FeedFullError,
    RecordedClassifier,
    decision_json,
)
from swarm.requester.fanout import Rejection, ReplyInfo
from tests.swarm.conftest import CLASS_NAMES


def result(label: int = 1, tops: tuple[int, ...] = (1, 1, 4)) -> ClassifyResult:
    """A decision of ``label`` over replies whose top-1 classes are ``tops``."""
    replies = tuple(
        ReplyInfo(f"peer{i}", f"T{i}", ((top, 0.7), (9, 0.2)), 2.5 * i, 0.9 - 0.1 * i)
        for i, top in enumerate(tops, start=1)
    )
    return ClassifyResult(
        label=label,
        class_name=CLASS_NAMES[label],
        confidence=0.8,
        certified_f=1,
        rule="robust",
        latency_ms=9.0,
        replies=replies,
        rejected=(Rejection("peer9", "bad_signature"),),
        missing=("peer8",),
        skipped=("peer7",),
        request_id="req-1",
    )


def tensor(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 28, 28), dtype=np.float32)


def decode_thumbnail(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))))


def test_entry_of_a_decision_has_the_input_and_every_peer() -> None:
    """A decision's entry: the input as a PNG of its pixels, each reply with its weight and
    whether it dissented, and the rejected, missing and skipped peers."""
    feed = DecisionFeed()
    x = tensor()
    doc = feed.decided(x, result()).to_json()
    assert (doc["seq"], doc["kind"], doc["label"], doc["class"]) == (1, "decision", "Trouser", 1)
    assert doc["request_id"] == "req-1"
    pixels = decode_thumbnail(doc["thumbnail"])
    assert pixels.shape == (28, 28)
    assert np.array_equal(pixels, np.round(x[0] * 255).astype(np.uint8))
    assert [r["dissent"] for r in doc["replies"]] == [False, False, True]
    assert [r["weight"] for r in doc["replies"]] == [0.8, 0.7, 0.6]
    assert doc["rejected"] == [{"peer": "peer9", "reason": "bad_signature"}]
    assert (doc["missing"], doc["skipped"]) == (["peer8"], ["peer7"])


def test_entry_of_a_failed_call_says_why_and_who() -> None:
    """A call without a decision: the error, and the rejected and missing peers."""
    feed = DecisionFeed()
    error = NoDecisionError("quorum not met", rejected=(("p1", "stale"),), missing=("p2",))
    doc = feed.failed(np.zeros((28, 28), dtype=np.uint8), error).to_json()
    assert doc["kind"] == "error"
    assert doc["error"] == "quorum not met"
    assert doc["rejected"] == [{"peer": "p1", "reason": "stale"}]
    assert doc["missing"] == ["p2"]
    assert decode_thumbnail(doc["thumbnail"]).max() == 0
    assert (feed.decided_count, feed.failed_count) == (0, 1)


def test_odd_inputs_get_no_thumbnail_or_a_small_one() -> None:
    """An input that is not an image has no thumbnail; a large one is scaled down."""
    feed = DecisionFeed()
    assert feed.decided(np.zeros(10, dtype=np.float32), result()).to_json()["thumbnail"] is None
    big = feed.decided(np.zeros((300, 200), dtype=np.float32), result()).to_json()
    assert max(decode_thumbnail(big["thumbnail"]).shape) <= 64


def test_feed_keeps_only_the_newest() -> None:
    """The feed is bounded: it keeps the last ``size`` entries, oldest first."""
    feed = DecisionFeed(size=3)
    for i in range(5):
        feed.decided(tensor(i), result())
    assert [e.seq for e in feed.recent()] == [3, 4, 5]
    assert len(feed) == 3


def test_bad_sizes_are_refused() -> None:
    """A feed with no room is a configuration error."""
    with pytest.raises(ConfigError):
        DecisionFeed(size=0)


async def test_subscriber_gets_entries_in_order() -> None:
    """A subscriber receives what was published after it subscribed, in order; waiting
    with nothing published returns empty after the timeout."""
    feed = DecisionFeed()
    feed.decided(tensor(), result())  # before: not delivered
    sub = feed.subscribe()
    assert await sub.next_batch(0.01) == []

    async def publish() -> None:
        await asyncio.sleep(0.01)
        feed.decided(tensor(1), result())
        feed.decided(tensor(2), result())

    task = asyncio.create_task(publish())
    got = await sub.next_batch(5.0)
    await task
    got += await sub.next_batch(0.01)
    assert [e.seq for e in got] == [2, 3]


async def test_lagging_subscriber_is_ended_not_grown() -> None:
    """A subscriber that falls ``queue`` entries behind is ended (it reconnects to a fresh
    snapshot) while the others go on receiving."""
    feed = DecisionFeed(queue=2)
    slow, fast = feed.subscribe(), feed.subscribe()
    for i in range(3):
        feed.decided(tensor(i), result())
        assert len(await fast.next_batch(0.01)) == 1
    assert slow.ended
    assert await slow.next_batch(1.0) == []
    feed.decided(tensor(), result())
    assert not fast.ended
    assert len(await fast.next_batch(0.01)) == 1


def test_subscribers_are_bounded_and_freed() -> None:
    """Past ``max_subscribers`` a subscribe fails with a clear error; unsubscribing, or
    closing the feed, frees the slots."""
    feed = DecisionFeed(max_subscribers=2)
    a, _ = feed.subscribe(), feed.subscribe()
    with pytest.raises(FeedFullError, match="2 live views are open"):
        feed.subscribe()
    feed.unsubscribe(a)
    feed.unsubscribe(a)  # idempotent
    assert a.ended
    feed.subscribe()
    feed.close()
    feed.subscribe()


class FakeRequester:
    input_shape = (1, 28, 28)

    def __init__(self, outcome: ClassifyResult | Exception) -> None:
        self.outcome = outcome
        self.calls: list[dict[str, Any]] = []

    async def classify(self, tensor: np.ndarray, **kwargs: Any) -> ClassifyResult:
        self.calls.append(kwargs)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


async def test_recorded_classifier_publishes_each_finished_call() -> None:
    """A decision is returned and published once; a NoDecisionError is published and
    raised; a bad parameter (ConfigError) is raised and not published."""
    feed = DecisionFeed()
    decided = RecordedClassifier(FakeRequester(result()), feed)
    policy = Policy(replicas=None)
    out = await decided.classify(tensor(), rule="median", k=3, policy=policy, quorum=2)
    assert out.request_id == "req-1"
    assert decided.inner.calls == [  # type: ignore[attr-defined]
        {"rule": "median", "k": 3, "policy": policy, "deadline_ms": None, "quorum": 2}
    ]
    with pytest.raises(NoDecisionError):
        await RecordedClassifier(FakeRequester(NoDecisionError("none")), feed).classify(tensor())
    with pytest.raises(ConfigError):
        await RecordedClassifier(FakeRequester(ConfigError("bad k")), feed).classify(tensor())
    assert [e.to_json()["kind"] for e in feed.recent()] == ["decision", "error"]


def test_decision_json_is_the_api_shape_plus_evidence() -> None:
    """The page's decision is ``to_json`` with the request id and per-reply weight and
    dissent added, nothing removed."""
    r = result(label=4, tops=(4, 1))
    doc = decision_json(r, image="x.png")
    base = r.to_json(image="x.png")
    assert set(base) <= set(doc)
    assert [x["dissent"] for x in doc["replies"]] == [False, True]
