"""Compressed updates: the site's side, a ClientApp mod.

With ``federation.update_compression`` the site replies with its change to the global adapter
quantized (:mod:`fed_llama.adapter.compression`) instead of its adapter, and keeps what the
rounding left out in its node state (never sent) to add to its next round's change. The
aggregator's side is :class:`fed_llama.server.compression.CompressedUpdates`. The mod runs
inside :func:`fed_llama.client.security.envelope_mod`, so the envelope carries the
compressed change.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Message

from fed_llama import wire
from fed_llama.client.federation import training_membership
from fed_llama.client.records import torch_state
from fed_llama.config.scenario import ScenarioConfig

RESIDUAL = "compression-residual"
"""The node state's record of what rounding left out of the site's last update."""

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def compression_mod(scenario: ScenarioConfig | None) -> Mod:
    """A ClientApp mod: on a training message of a federation with
    ``federation.update_compression``, reply with the compressed change (``scenario``: the
    one ``fed-llama simulate`` built the app around; None: from the run or the site)."""

    def mod(msg: Message, context: Context,
            call_next: Callable[[Message, Context], Message]) -> Message:
        member = training_membership(msg, context, scenario)
        if member is None:
            return call_next(msg, context)
        scheme = member.scenario.federation.update_compression
        if scheme == "none":
            return call_next(msg, context)
        current = torch_state(msg.content.array_records[wire.ARRAYS])
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        from fed_llama.adapter.compression import compress  # torch: not at import

        kept = context.state.array_records.get(RESIDUAL)
        record, left = compress(torch_state(reply.content.array_records[wire.ARRAYS]),
                                current, scheme, torch_state(kept) if kept else None)
        context.state[RESIDUAL] = ArrayRecord(left)
        reply.content[wire.ARRAYS] = ArrayRecord(record)
        return reply

    return mod
