"""fed-llama's errors as Flower logs them in a deployed ServerApp: one line, not a traceback.

Flower logs an exception raised by the ServerApp with its traceback (``flwr-serverapp``'s
``ServerApp raised an exception``, streamed to ``flwr run``). For a fed-llama error (a bad
scenario, an unwritable run folder) the traceback says nothing the error's line does not; the
filter here shows that line alone. Any other exception keeps its traceback, and Flower still
marks the run failed.
"""

from __future__ import annotations

import logging

from fed_llama.errors import FedLlamaError


class OneLineErrors(logging.Filter):
    """A logger filter that shows a :class:`FedLlamaError` logged with its traceback as one
    line, ``fed-llama: error: <what and the fix>``."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, FedLlamaError):
            record.msg, record.args = "fed-llama: error: %s", (exc,)
            record.exc_info, record.exc_text = None, None
        return True


def one_line_flower_errors() -> None:
    """Add :class:`OneLineErrors` to Flower's logger in this process, once."""
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, OneLineErrors) for f in logger.filters):
        logger.addFilter(OneLineErrors())
