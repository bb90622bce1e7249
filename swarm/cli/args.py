"""Argument types shared by the command-line tools (``swarm.peer``, ``swarm.classify``).

Each returns the parsed value or raises ``argparse.ArgumentTypeError`` with a message that
says what was given and what is expected; argparse prefixes it with the flag's name.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
from collections.abc import Callable
from typing import Literal

from swarm.wire import messages as wire


def ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def swarm_name(text: str) -> str:
    if not wire.is_valid_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a swarm name (1-63 of A-Za-z0-9._-)")
    return text


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """Integers in [lo, hi] (no upper bound when ``hi`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if value < lo or (hi is not None and value > hi):
            span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer {span}")
        return value

    return parse


def number(
    lo: float, hi: float = math.inf, *, above: bool = False, what: str = "a number"
) -> Callable[[str], float]:
    """Finite numbers >= lo (> lo with ``above``) and <= hi; ``what`` names them in errors."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > lo if above else value >= lo
        if not (low_ok and value <= hi and math.isfinite(value)):
            if math.isinf(hi):
                span = f"{'>' if above else '>='} {lo:g}"
            else:
                span = f"in {'(' if above else '['}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} {span}")
        return value

    return parse


def wave(text: str) -> int | Literal["auto"] | None:
    """``auto``, ``all`` (None: every one) or an integer >= 1 (``--wave``)."""
    if text == "auto":
        return "auto"
    try:
        return replicas(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither 'auto', 'all' nor an integer >= 1"
        ) from None


def replicas(text: str) -> int | None:
    """``all`` (None: every one) or an integer >= 1 (``--replicas``)."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'all' nor an integer >= 1")
    return value
