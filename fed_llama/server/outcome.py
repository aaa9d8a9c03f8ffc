"""A training round's outcome: which sites trained, which failed, and whether the round counts.

A round counts when

- ``federation.min_sites`` > 0: at least that many sites trained and their updates passed
  the aggregator's checks (at most the nodes the round was sent to: one in a cyclic round);
- ``federation.min_sites`` = 0: every node the round was sent to replied without failing,
  and at least one update passed the checks. Updates the aggregator refuses (a forged,
  replayed or outsized update) do not stop such a round: refusing them is what the checks are
  for, and the round goes on with the rest; set ``min_sites`` for a quorum of good updates.

A round that does not count writes no checkpoint and no seal: the strategy raises
:class:`RoundFailed`, whose one-line message names each site's failure as the site's ClientApp
reported it (Flower's error reply: ``Message.error.reason``, never data), and the ServerApp
records the round's row (``failed`` and the counts) and stops the run, which Flower then lists
as failed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fed_llama.errors import FedLlamaError

if TYPE_CHECKING:
    from flwr.app import Message

log = logging.getLogger(__name__)

FAILED = "failed"
"""The history key of a round that did not count: its one-line reason."""

MAX_REASON = 300
"""Characters kept of one site's reason (a ClientApp's exception message)."""

_FLOWER_REASON = re.compile(r"<class '([^']*)'>:<'(.*)'>", re.S)
"""How Flower wraps a ClientApp's exception: ``<class 'ValueError'>:<'message'>``."""
_SIMULATION_MARK = "ClientAppException occurred. Message: "


class RoundFailed(FedLlamaError):
    """Fewer sites than the round needs trained; ``row`` is the round's history row."""

    def __init__(self, message: str, row: dict[str, Any]) -> None:
        super().__init__(message)
        self.row = row


def reply_reason(reason: str) -> str:
    """A site's failure in one line: the ClientApp's exception message without Flower's
    ``<class ...>:<'...'>`` wrapping (the class name stays when the message is empty)."""
    found = _FLOWER_REASON.fullmatch(reason.strip())
    text = (found.group(2) or found.group(1)) if found else reason
    # the Simulation Engine's reason is a Ray traceback ending in ClientAppException's text
    text = text.rpartition(_SIMULATION_MARK)[2]
    line = " ".join(text.split()) or "no reason given"
    return line if len(line) <= MAX_REASON else line[:MAX_REASON - 3] + "..."


@dataclass
class RoundOutcome:
    """What became of one round's training messages."""

    real_round: int
    sent: list[int]
    """The nodes the round's training message went to."""
    failed: dict[int, str] = field(default_factory=dict)
    """Node -> the reason its ClientApp gave (or Flower gave for it)."""
    missing: list[int] = field(default_factory=list)
    """Nodes sent the round that never replied (the round timed out on them)."""

    def counts(self) -> dict[str, float]:
        """The history row's ``sites-sent``, ``sites-failed`` (no reply counts as failed)."""
        return {"sites-sent": float(len(self.sent)),
                "sites-failed": float(len(self.failed) + len(self.missing))}

    def check(self, trained: int, min_sites: int, row: Mapping[str, float]) -> None:
        """Raise :class:`RoundFailed` unless the round counts (see the module's docstring):
        ``trained`` updates passed the checks, ``row`` holds the refusals' counts."""
        sent = len(self.sent)
        if min_sites:
            need = min(min_sites, sent)
            if sent and trained >= need:
                return
        elif sent and trained >= 1 and not self.failed and not self.missing:
            return
        rule = (f"{need} needed (federation.min_sites = {min_sites})" if min_sites else
                "every site sent the round must reply and an update pass the checks "
                "(federation.min_sites = 0)")
        parts = [f"node {node}: {reason}" for node, reason in self.failed.items()]
        parts += [f"node {node}: no reply within federation.round_timeout"
                  for node in self.missing]
        refused = {k.split("/", 1)[1]: int(v) for k, v in row.items()
                   if k.startswith("refused/") and v}
        if refused:
            parts.append("update(s) refused by the aggregator: " + ", ".join(
                f"{reason} x{n}" for reason, n in sorted(refused.items())))
        if not self.sent:
            parts.append("no connected node was sent the round")
        message = (f"round {self.real_round}: {trained} of {len(self.sent)} site(s) trained, "
                   f"{rule}; " + "; ".join(parts or ["no reason given"]))
        full = {"round": self.real_round, **row, **self.counts(),
                "sites-trained": float(trained), FAILED: message}
        raise RoundFailed(message, full)


def split_replies(replies: Iterable[Message], sent: list[int], real_round: int,
                  refused: Iterable[int] = ()) -> tuple[list[Message], RoundOutcome]:
    """The replies without errors, and the round's outcome so far (each failure logged with
    the site's reason); ``refused``: nodes whose replies came and were refused on the way
    (not missing).

    When a node dies mid-round, Flower's SuperLink answers for it with an error reply whose
    source is the SuperLink, not the node: such an error (from no node the round was sent to)
    is the failure of one node that sent nothing, so a dead site counts once, with Flower's
    reason."""
    outcome = RoundOutcome(real_round, list(sent))
    good: list[Message] = []
    seen: set[int] = set(refused)
    unattributed: list[str] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = reply_reason(reply.error.reason or "")
            if node in sent:
                seen.add(node)
                outcome.failed[node] = reason
                log.warning("round %d: node %s failed: %s", real_round, node, reason)
            else:  # the SuperLink's reply for a node it lost
                unattributed.append(reason)
        else:
            seen.add(node)
            good.append(reply)
    missing = [node for node in sent if node not in seen]
    for node, reason in zip(missing, unattributed, strict=False):
        outcome.failed[node] = reason
        log.warning("round %d: node %s failed: %s", real_round, node, reason)
    outcome.missing = [node for node in missing if node not in outcome.failed]
    for node in outcome.missing:
        log.warning("round %d: node %s sent no reply", real_round, node)
    return good, outcome
