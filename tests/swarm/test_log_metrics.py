"""Tests of swarm.log (structlog set-up, per-task context) and swarm.metrics (registries)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from swarm.errors import ConfigError
from swarm.log import (
    bind_peer,
    bind_request,
    bound,
    clear_context,
    configure_logging,
    get_logger,
    reset_logging,
)
from swarm.metrics import Metrics, render

log = get_logger("tests.log")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream to log into; logging and bound context are reset afterwards."""
    out = io.StringIO()
    clear_context()
    yield out
    reset_logging()
    clear_context()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_event_level_time_and_context(stream: io.StringIO) -> None:
    """JSON output is one object per line with event, level, timestamp, logger and context."""
    configure_logging("json", stream=stream)
    bind_peer("p" * 20)
    bind_request("r1")
    log.info("request_served", status=200)
    (line,) = lines(stream)
    assert line["event"] == "request_served"
    assert line["level"] == "info"
    assert line["logger"] == "tests.log"
    assert line["peer_id"] == "p" * 20
    assert line["request_id"] == "r1"
    assert line["status"] == 200
    assert line["timestamp"].endswith("Z")


async def test_context_is_bound_per_task(stream: io.StringIO) -> None:
    """A request id bound in one task appears only on that task's lines."""
    configure_logging("json", stream=stream)
    bind_peer("me")

    async def handle(request_id: str) -> None:
        bind_request(request_id)
        await asyncio.sleep(0)  # interleave the two tasks
        log.info("handled")

    await asyncio.gather(handle("a"), handle("b"))
    log.info("outside")
    got = {(line["event"], line.get("request_id"), line["peer_id"]) for line in lines(stream)}
    assert got == {("handled", "a", "me"), ("handled", "b", "me"), ("outside", None, "me")}


def test_module_loggers_follow_every_reconfiguration(stream: io.StringIO) -> None:
    """A module logger keeps the logger it assembled only until the next configuration:
    a new level, format or stream applies to it at once, and capture_logs sees it."""
    configure_logging("json", level="warning", stream=stream)
    log.info("hidden")
    log.warning("first")
    configure_logging("json", level="info", stream=stream)
    log.info("second")
    assert [line["event"] for line in lines(stream)] == ["first", "second"]
    with capture_logs() as captured:
        log.info("captured", n=1)
    assert captured == [{"event": "captured", "n": 1, "log_level": "info"}]
    log.info("third")
    other = io.StringIO()
    configure_logging("console", stream=other)
    log.info("fourth")
    assert [line["event"] for line in lines(stream)] == ["first", "second", "third"]
    assert "fourth" in other.getvalue()
    reset_logging()
    with capture_logs() as captured:
        log.debug("after_reset")
    assert [entry["event"] for entry in captured] == ["after_reset"]


def test_bound_restores_previous_context(stream: io.StringIO) -> None:
    """bound() adds keys for a block only."""
    configure_logging("json", stream=stream)
    with bound(request_id="x", hop=1):
        log.info("inside")
    log.info("after")
    inside, after = lines(stream)
    assert (inside["request_id"], inside["hop"]) == ("x", 1)
    assert "request_id" not in after


def test_level_filters_events(stream: io.StringIO) -> None:
    """Events below the configured level are dropped."""
    configure_logging("json", level="warning", stream=stream)
    log.info("quiet")
    log.warning("loud")
    assert [line["event"] for line in lines(stream)] == ["loud"]


def test_console_format_is_for_people(stream: io.StringIO) -> None:
    """Console output is one readable line with the event and key=value pairs, no colour."""
    configure_logging("console", stream=stream)
    log.info("peer_seen", variant="T1")
    text = stream.getvalue()
    assert "peer_seen" in text
    assert "variant=T1" in text
    assert "\x1b[" not in text


def test_stdlib_records_use_the_same_renderer(stream: io.StringIO) -> None:
    """Libraries logging through stdlib (zeroconf, aiohttp) come out as the same JSON, once."""
    configure_logging("json", stream=stream)
    configure_logging("json", stream=stream)  # reconfiguring does not double the handler
    logging.getLogger("zeroconf").warning("odd packet from %s", "127.0.0.1")
    (line,) = lines(stream)
    assert line["event"] == "odd packet from 127.0.0.1"
    assert line["level"] == "warning"


def test_exceptions_are_structured_in_json(stream: io.StringIO) -> None:
    """log.exception in JSON mode carries the exception type and message as data."""
    configure_logging("json", stream=stream)
    try:
        int("bad input")
    except ValueError:
        log.exception("request_failed")
    (line,) = lines(stream)
    assert line["event"] == "request_failed"
    assert line["exception"][0]["exc_type"] == "ValueError"
    assert "bad input" in line["exception"][0]["exc_value"]


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "loud")])
def test_bad_settings_are_config_errors(fmt: Any, level: str) -> None:
    """An unknown format or level is a ConfigError naming the valid choices."""
    with pytest.raises(ConfigError, match="use"):
        configure_logging(fmt, level=level)


def test_metrics_registries_are_independent() -> None:
    """Two peers in one process keep separate series (no duplicate-registration error)."""
    a, b = Metrics(), Metrics()
    a.observe_request("/v1/infer", 200)
    a.observe_request("/v1/infer", 200)
    b.observe_request("/v1/infer", 429)
    labels = {"endpoint": "/v1/infer", "status": "200"}
    assert a.registry.get_sample_value("vswarm_requests_total", labels) == 2
    assert b.registry.get_sample_value("vswarm_requests_total", labels) is None


def test_metrics_record_every_series() -> None:
    """Each observe_* call lands in its series with its labels."""
    m = Metrics()
    m.observe_batch(4, 0.002, 0.0015)
    m.observe_batch(1, 0.001)  # CPU unknown: the wall clock alone
    m.observe_classify(0.05, rule="trimmed_mean")
    m.observe_rejection("bad_signature")
    m.set_peer_counts(usable=3, suspected=1, total=5)
    get = m.registry.get_sample_value
    assert get("vswarm_batch_size_sum") == 5
    assert get("vswarm_inference_seconds_count") == 2
    assert get("vswarm_inference_cpu_seconds_total") == 0.0015
    assert get("vswarm_classify_seconds_count") == 1
    assert get("vswarm_votes_total", {"rule": "trimmed_mean"}) == 1
    assert get("vswarm_rejections_total", {"reason": "bad_signature"}) == 1
    assert get("vswarm_peers", {"state": "usable"}) == 3
    assert get("vswarm_peers", {"state": "total"}) == 5


def test_render_is_prometheus_text() -> None:
    """render gives the text exposition format and its content type."""
    m = Metrics()
    m.observe_request("/v1/classify", 200)
    body, content_type = render(m.registry)
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert 'vswarm_requests_total{endpoint="/v1/classify",status="200"} 1.0' in text
    assert "# TYPE vswarm_inference_seconds histogram" in text
