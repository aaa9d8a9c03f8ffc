"""The ServerApp asks the SuperLink for the sites' replies again after a 500 (Flower 1.41's
SQLite "database is locked" under load, which its SuperLink answers as "Internal server
error."), and only then: every other error reaches the caller at once."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import httpx
import pytest

from fed_llama.server import pull_retry
from fed_llama.server.pull_retry import retry_pulls, retrying_pull


def _status(code: int, text: str = "") -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://127.0.0.1:9091/pull-messages")
    return httpx.HTTPStatusError(str(code), request=request,
                                 response=httpx.Response(code, text=text, request=request))


class FlakyPulls:
    """A pull that fails with ``errors`` in turn, then returns one reply per id asked for."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.asked: list[list[str]] = []

    def __call__(self, ids):
        self.asked.append(list(ids))
        if self.errors:
            raise self.errors.pop(0)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]


def _replied_to(replies) -> list[str]:
    return [r.metadata.reply_to_message_id for r in replies]


def test_a_500_is_asked_again_with_the_same_ids_after_a_growing_pause(caplog):
    flaky, pauses = FlakyPulls(_status(500, "Internal server error."), _status(500)), []
    with caplog.at_level(logging.WARNING, logger=pull_retry.__name__):
        replies = retrying_pull(flaky, sleep=pauses.append)(iter(["m1", "m2"]))
    assert _replied_to(replies) == ["m1", "m2"]
    assert flaky.asked == [["m1", "m2"]] * 3  # a spent iterator would have asked for []
    assert pauses == [2.0, 4.0]
    assert "Internal server error." in caplog.text and "try 2 of 6" in caplog.text
    assert "misses this round" in caplog.text  # what a late retry may cost, said where it happens


@pytest.mark.parametrize("error", [_status(403), _status(404), _status(413),
                                   httpx.ConnectError("refused"), ValueError("bad reply")])
def test_any_other_error_reaches_the_caller_at_once(error):
    flaky, pauses = FlakyPulls(error), []
    with pytest.raises(type(error)):
        retrying_pull(flaky, sleep=pauses.append)(["m1"])
    assert len(flaky.asked) == 1 and pauses == []


def test_a_500_that_persists_is_raised_after_the_last_try():
    flaky, pauses = FlakyPulls(*[_status(500)] * pull_retry.TRIES), []
    with pytest.raises(httpx.HTTPStatusError):
        retrying_pull(flaky, sleep=pauses.append)(["m1"])
    assert len(flaky.asked) == pull_retry.TRIES
    assert pauses == [2.0, 4.0, 8.0, 16.0, 30.0]  # capped at MAX_PAUSE


def test_flowers_wait_for_replies_goes_through_the_retry(monkeypatch):
    """Flower's Grid.send_and_receive pulls through ``self.pull_messages``: wrapping it on the
    grid covers the strategies' waits; wrapping twice retries once, not squared."""
    from flwr.superlink.grid.http_grid import HttpGrid

    grid = HttpGrid.__new__(HttpGrid)  # no connection: push and pull are stubbed below
    flaky = FlakyPulls(_status(500))
    monkeypatch.setattr(grid, "push_messages", lambda msgs: ["m1"], raising=False)
    monkeypatch.setattr(grid, "pull_messages", flaky, raising=False)
    monkeypatch.setattr(pull_retry.time, "sleep", lambda s: None)
    assert retry_pulls(retry_pulls(grid)) is grid
    assert _replied_to(grid.send_and_receive([], timeout=5)) == ["m1"]
    assert len(flaky.asked) == 2
