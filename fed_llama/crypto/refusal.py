"""The one exception every failed check raises, with a machine-readable reason."""

from __future__ import annotations

from typing import Literal

from fed_llama.errors import FedLlamaError

Reason = Literal[
    "oversized",         # more bytes than the configured bound, refused before parsing
    "malformed",         # not an envelope at all: bad magic, header or layout
    "truncated",         # shorter than its header says
    "unknown-site",      # the site is not in the aggregator's trust store
    "bad-signature",     # forged, or altered after signing (a flipped ciphertext bit lands here)
    "wrong-run",         # made for another federation run
    "replayed",          # a round already past, or a nonce already seen
    "wrong-round",       # a round that has not started
    "stale",             # issued too long ago, or in the future beyond the allowed skew
    "decrypt-failed",    # not encrypted to this aggregator's key, or bound to another header
    "payload-mismatch",  # the plaintext is not what the signed header describes
    "wrong-names",       # tensor names differ from the global adapter's
    "wrong-shape",       # a tensor's shape differs from the global adapter's
    "wrong-dtype",       # a tensor's dtype differs from the global adapter's
    "non-finite",        # NaN or Inf in the update
    "frozen-changed",    # a tensor the method keeps frozen was changed (FFA-LoRA's A)
    "norm-bound",        # the update's norm is beyond the bound
    "bad-key",           # a key file or key bytes that cannot be used
    "bad-seal",          # a round seal that does not verify
]

REASONS: tuple[str, ...] = Reason.__args__  # type: ignore[attr-defined]


class Refused(FedLlamaError):
    """A check failed. ``reason`` says which (one of :data:`Reason`); the message says why."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"refused ({reason}): {detail}")
        self.reason: Reason = reason
        self.detail = detail
