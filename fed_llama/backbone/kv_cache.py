"""Passing and reading a causal LM's KV cache across transformers 5.x releases.

transformers 5.24 renamed the cache of ``forward`` and of its output from
``past_key_values`` to ``cache``; the old name still works there but logs a deprecation
notice and is to go in 5.40. Earlier 5.x releases (which ``pyproject.toml`` accepts) know only
the old name. These two functions use whichever name the installed model takes.
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_argument(model: Any) -> str:
    """The name of the keyword argument that hands a cache to ``model``'s forward."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache``, or ``past_key_values`` before 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
