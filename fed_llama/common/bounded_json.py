"""JSON from the network or a file, parsed in bounded time, memory and recursion.

:func:`loads` gives the value or raises :class:`BadJson` (a ``ValueError``) with the reason,
and nothing else, whatever the bytes: it bounds the size and the nesting depth before the
parser sees the text (Python's parser recurses, so a deep array would otherwise raise
``RecursionError``), parses integers only up to :data:`MAX_INT_DIGITS` digits (a number of
hundreds of digits is refused, not turned into an ``OverflowError`` later), refuses the
``NaN`` / ``Infinity`` literals, floats that overflow to infinity (``1e999``), duplicate
object keys, and strings holding lone UTF-16 surrogates (``"\\ud800"``), which cannot be
encoded again. Callers turn :class:`BadJson` into their own refusal (an envelope's
``malformed``, a key file's ``bad-key``, an adapter folder's error).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted (the formats read here use 4 at most)."""
MAX_INT_DIGITS = 19
"""Most digits of a JSON integer (every int64 fits)."""
MAX_FLOAT_CHARS = 64
"""Longest JSON number with a fraction or exponent, in characters."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class BadJson(ValueError):
    """The bytes are not JSON within the bounds; the message says what is wrong."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadJson(f"an integer of {len(text.lstrip('-'))} digits (at most "
                      f"{MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_FLOAT_CHARS:
        raise BadJson(f"a number of {len(text)} characters (at most {MAX_FLOAT_CHARS})")
    value = float(text)
    if not math.isfinite(value):
        raise BadJson(f"the number {text[:20]} is out of range")
    return value


def _constant(text: str) -> Any:
    raise BadJson(f"{text} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadJson(f"the key {key[:40]!r} appears twice in one object")
        out[key] = value
    return out


def _depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings (an upper bound for bad JSON)."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates in any string (iterative: the depth is bounded already)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadJson("a string holds a lone UTF-16 surrogate") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads(raw: bytes | bytearray | str, *, max_bytes: int = 1 << 20,
          max_depth: int = MAX_DEPTH, constants: bool = False) -> Any:
    """The JSON value of ``raw`` (UTF-8 bytes or text), or :class:`BadJson`.

    ``constants``: accept Python's ``NaN``, ``Infinity`` and ``-Infinity`` literals (for
    files this project writes itself with :func:`json.dumps`, such as a run's history, where
    a metric may be NaN); never for what comes from another party.
    """
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > max_bytes:
            raise BadJson(f"{len(raw)} bytes of JSON is over the bound of {max_bytes}")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadJson(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    elif isinstance(raw, str):
        text = raw
        if len(text) > max_bytes:
            raise BadJson(f"{len(text)} characters of JSON is over the bound of {max_bytes}")
    else:
        raise BadJson(f"JSON comes as bytes or text; got {type(raw).__name__}")
    if _depth(text) > max_depth:
        raise BadJson(f"nested deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float,
                           parse_constant=float if constants else _constant,
                           object_pairs_hook=_object)
    except BadJson:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BadJson(str(exc)[:200]) from None
    _check_strings(value)
    return value
