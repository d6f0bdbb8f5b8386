"""Argument types and checks shared by the subcommands.

Every type refuses what a range check alone would let through: ``nan`` and ``inf`` (``nan``
passes no comparison, so ``not nan > 0`` style checks are the only safe form), numbers too
large for SQLite or torch, and host names no resolver would accept.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from typing import Any

from engine.textdata import utf8_problem

MAX_WHOLE = 2**63 - 1  # SQLite integers and torch seeds are 64-bit
# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# Values that name files or models: a non-UTF-8 byte there is a legitimate file name.
PATH_DESTS = frozenset({"model", "teacher", "data", "out", "db", "output"})


def whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if abs(value) > MAX_WHOLE:
        raise argparse.ArgumentTypeError(f"{text} is too large (at most {MAX_WHOLE})")
    return value


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def non_negative_int(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def host_name(text: str) -> str:
    """An IP address or an RFC 1123 host name; ``256.1.1.1`` is neither."""
    host = text.strip()
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    looks_numeric = all(label.isdigit() for label in labels)
    if not host or looks_numeric or len(host) > 253 or \
            not all(HOST_LABEL.fullmatch(label) for label in labels):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address or host name (e.g. 127.0.0.1 or localhost)")
    return host


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [text for item in value for text in _strings(item)]
    return []


def non_utf8_argument(args: argparse.Namespace) -> str | None:
    """A one-line complaint about the first text argument that is not UTF-8, else None.

    Python decodes such argv bytes to lone surrogates, which fail later, deep inside a
    tokenizer or a JSON encoder, with a traceback.
    """
    for dest, value in vars(args).items():
        if dest in PATH_DESTS:
            continue
        for text in _strings(value):
            problem = utf8_problem(text)
            if problem is not None:
                name = dest.replace("_", "-")
                return f"the {name} argument is not valid UTF-8 ({problem}); give UTF-8 text"
    return None
