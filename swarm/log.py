"""Structured logging for the swarm runtime, through structlog.

``configure_logging`` is called once by an entry point: JSON lines for machines, coloured
key=value lines for people, both on stderr. Library modules only ever call
``get_logger(__name__)`` and log event names with key-value pairs.

Context (the peer id, the request id) is bound with contextvars. An asyncio task copies
the context when it is created, so a value bound inside a request's task stays with that
request and never leaks into other tasks.

Records from the standard library's ``logging`` (zeroconf, aiohttp, asyncio) are routed
through the same renderer, so one process writes one format.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Final, Literal, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger, Processor

from swarm.errors import ConfigError

LogFormat = Literal["json", "console"]

_LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# The stdlib handler we install is recognised by this name, so configuring twice
# replaces it instead of printing every record twice.
_HANDLER_NAME: Final = "vswarm"

# Bumped by every (re)configuration: a module logger assembles its structlog logger again
# once after each. structlog's own lazy proxy assembles one on every call (about 6 us, a
# few per classify call), and its cache_logger_on_first_use would keep a logger made
# before a reconfiguration for good. A logger kept here still sees structlog.testing's
# capture_logs, which swaps the processors inside the configured list itself.
_GENERATION: Final = [0]

PEER_ID_KEY: Final = "peer_id"
REQUEST_ID_KEY: Final = "request_id"


def _shared_processors() -> list[Processor]:
    # Applied to our events and, as the formatter's pre-chain, to stdlib records alike.
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _renderer(fmt: LogFormat, stream: TextIO) -> list[Processor]:
    if fmt == "json":
        return [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(sort_keys=True),
        ]
    colors = bool(getattr(stream, "isatty", lambda: False)())
    return [structlog.dev.ConsoleRenderer(colors=colors)]


def configure_logging(
    fmt: LogFormat = "console", level: str = "info", *, stream: TextIO | None = None
) -> None:
    """Set up structlog and stdlib logging for this process; safe to call again."""
    if fmt not in ("json", "console"):
        raise ConfigError(f"unknown log format {fmt!r}: use 'json' or 'console'")
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ConfigError(f"unknown log level {level!r}: use one of {', '.join(_LEVELS)}")
    out = stream if stream is not None else sys.stderr

    _GENERATION[0] += 1
    # structlog events are filtered by level, then handed to stdlib logging, whose one
    # handler renders them and every foreign record (zeroconf, aiohttp) the same way.
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # structlog's cache would pin loggers made before a reconfiguration; the
        # module loggers (get_logger) keep theirs until the next one instead.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer(fmt, out),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    _remove_our_handlers(root)
    root.addHandler(handler)
    root.setLevel(numeric)


def reset_logging() -> None:
    """Undo ``configure_logging``: structlog defaults, our stdlib handler removed."""
    _GENERATION[0] += 1
    structlog.reset_defaults()
    root = logging.getLogger()
    _remove_our_handlers(root)
    root.setLevel(logging.WARNING)  # the stdlib default


def _remove_our_handlers(root: logging.Logger) -> None:
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger for module ``name`` (shown as ``logger=name``); safe at import time."""
    return cast(FilteringBoundLogger, _ModuleLogger(name))


class _ModuleLogger:
    """A module's logger: structlog's, assembled once per configuration."""

    __slots__ = ("_generation", "_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._generation = -1
        self._logger: FilteringBoundLogger | None = None

    def __getattr__(self, attr: str) -> object:
        logger = self._logger
        if logger is None or self._generation != _GENERATION[0]:
            logger = self._logger = structlog.get_logger(self._name).bind()
            self._generation = _GENERATION[0]
        return getattr(logger, attr)

    def __repr__(self) -> str:
        return f"<logger {self._name}>"


def bind_peer(peer_id: str) -> None:
    """Bind this peer's id to every event logged from the current context (task)."""
    structlog.contextvars.bind_contextvars(**{PEER_ID_KEY: peer_id})


def bind_request(request_id: str) -> None:
    """Bind a request id to every event logged from the current context (task)."""
    structlog.contextvars.bind_contextvars(**{REQUEST_ID_KEY: request_id})


@contextlib.contextmanager
def bound(**values: object) -> Iterator[None]:
    """Bind ``values`` for the duration of a ``with`` block, restoring what was there."""
    with structlog.contextvars.bound_contextvars(**values):
        yield


def clear_context() -> None:
    """Drop every value bound in the current context."""
    structlog.contextvars.clear_contextvars()
