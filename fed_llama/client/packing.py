"""Packed arrays on the wire: the site's side, a ClientApp mod.

The aggregator (:class:`fed_llama.server.packing.PackedArrays`) sends the adapter as one array
and its layout (:mod:`fed_llama.adapter.packed_arrays`). :func:`packing_mod` unpacks it before
any other mod or handler sees the message, and packs the reply's arrays when the message came
packed (a reply in an envelope carries none). It runs outside
:func:`fed_llama.client.security.envelope_mod`: the round seal is checked on the unpacked
adapter, the same tensors the aggregator sealed.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message

from fed_llama import wire
from fed_llama.adapter.packed_arrays import packed_content, unpacked_content


def packing_mod(msg: Message, context: Context,
                call_next: Callable[[Message, Context], Message]) -> Message:
    """Unpack the message's arrays, and pack the reply's, where the message came packed."""
    if not msg.has_content() or wire.ARRAYS_LAYOUT not in msg.content.config_records:
        return call_next(msg, context)
    msg.content = unpacked_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = packed_content(reply.content)
    return reply
