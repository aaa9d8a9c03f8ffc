"""Pulling the sites' replies again when the SuperLink answers with a server error.

Under load, Flower 1.41's SuperLink can hold its SQLite state locked longer than it waits for
it (a fixed 5 s ``busy_timeout``) and answer the ServerApp's request for replies with a 500
(its body says only "Internal server error."; its log says "database is locked"). Flower's
ServerApp client retries 502, 503 and 504 but not 500, so the exception ended the ServerApp
and the round with it (1.42 is the same: the same ``busy_timeout``, the same retryable codes).
Here a pull that got a 500 is tried again a few times, with a growing pause, before the error
is let through. Pushes are never retried: that could send a site the same round twice.

What a retry can and cannot mend. The SuperLink answers a pull in three writes: it marks the
replies delivered, takes any instruction addressed to the ServerApp itself, deletes the answered
instructions; the ServerApp then fetches each reply's objects and confirms them. A lock on the
first write changes nothing, and asking again returns the replies. A 500 from any later step
comes after the replies were marked delivered, and the SuperLink never hands those out again:
those sites count as not having replied in this round, which waits for them until
``federation.round_timeout`` and then goes on with the others (``federation.min_sites``
decides whether it completes). Without the retry the ServerApp would have exited, and the run
would wait for its operator to submit it again. Each retry is logged as a warning that says
so. Not used on the SecAgg+ path (``server.app``), whose evaluation waits without a timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message

log = logging.getLogger(__name__)

TRIES = 6
"""Pulls in all for one request: the first and five more, 2 + 4 + 8 + 16 + 30 s apart (about
a minute, over ten of the SuperLink's own 5 s waits)."""
FIRST_PAUSE = 2.0
MAX_PAUSE = 30.0


def _server_error(exc: Exception) -> bool:
    import httpx

    return (isinstance(exc, httpx.HTTPStatusError)
            and exc.response.status_code == httpx.codes.INTERNAL_SERVER_ERROR)


def retrying_pull(pull: Callable[[Iterable[str]], Iterable[Message]],
                  sleep: Callable[[float], Any] | None = None
                  ) -> Callable[[Iterable[str]], Iterable[Message]]:
    """``pull`` (a Grid's ``pull_messages``), tried again up to ``TRIES`` times in all while
    the SuperLink answers 500; any other error, and the last 500, go to the caller
    (``sleep``: ``time.sleep`` unless given)."""

    def pull_messages(message_ids: Iterable[str]) -> Iterable[Message]:
        ids = list(message_ids)  # an iterator would be spent by the first try
        pause = FIRST_PAUSE
        for attempt in range(1, TRIES + 1):
            try:
                return pull(ids)
            except Exception as exc:
                if not _server_error(exc) or attempt == TRIES:
                    raise
                log.warning("the SuperLink answered a request for the sites' replies with a "
                            "server error (%s; its log says why); asking again in %.0f s "
                            "(try %d of %d). A site whose reply this request had already "
                            "taken misses this round: it waits for it until round_timeout",
                            _reason(exc), pause, attempt + 1, TRIES)
                (sleep or time.sleep)(pause)
                pause = min(2 * pause, MAX_PAUSE)
        raise AssertionError("unreachable")  # pragma: no cover

    return pull_messages


def _reason(exc: Any) -> str:
    """The start of a 500's body, on one line (``exc``: an ``httpx.HTTPStatusError``)."""
    return " ".join(exc.response.text.split())[:120] or str(exc)


def retry_pulls(grid: Any) -> Any:
    """``grid`` with its ``pull_messages`` retried on a 500 (see the module). Flower's own
    ``send_and_receive`` calls ``self.pull_messages``, so the strategies' waits for replies
    go through it too. Returns the same grid."""
    if not getattr(grid, "_fed_llama_pull_retry", False):
        grid.pull_messages = retrying_pull(grid.pull_messages)
        grid._fed_llama_pull_retry = True
    return grid
