"""Signed global rounds: the aggregator signs each round's global adapter, hash-chained.

A :class:`RoundSeal` says "round N of run R starts from the adapter whose tensor manifest
hashes to H, and follows the round whose seal hashes to P". Sites verify it before training
(:func:`verify_round`), so a relay cannot hand them another adapter; the chain of seals in a
run folder lets anyone check afterwards that no round was swapped or dropped.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from fed_llama.crypto.envelope import TensorSpec
from fed_llama.crypto.keys import ServerKey, ServerPublicKey
from fed_llama.crypto.refusal import Refused

GENESIS = "0" * 64


def manifest_digest(tensors: tuple[TensorSpec, ...]) -> str:
    """One sha256 over a tensor manifest (names, dtypes, shapes and each tensor's sha256)."""
    canon = json.dumps([[t.name, t.dtype, list(t.shape), t.sha256]
                        for t in sorted(tensors, key=lambda t: t.name)], separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RoundSeal:
    """The aggregator's signature over one round's starting point."""

    run: str
    round: int
    adapter_sha256: str
    prev: str
    signature: bytes

    def body(self) -> bytes:
        return json.dumps({"run": self.run, "round": self.round, "adapter": self.adapter_sha256,
                           "prev": self.prev}, sort_keys=True,
                          separators=(",", ":")).encode("utf-8")

    @property
    def digest(self) -> str:
        """The chain link the next round's seal names as ``prev``."""
        return hashlib.sha256(self.body() + self.signature).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "round": self.round, "adapter_sha256": self.adapter_sha256,
                "prev": self.prev, "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_json(cls, data: Any) -> RoundSeal:
        try:
            return cls(str(data["run"]), int(data["round"]), str(data["adapter_sha256"]),
                       str(data["prev"]), base64.b64decode(data["signature"], validate=True))
        except (KeyError, TypeError, ValueError) as exc:
            raise Refused("bad-seal", f"the round seal cannot be read: {exc}") from exc


def seal_round(key: ServerKey, *, run: str, server_round: int, adapter_sha256: str,
               prev: RoundSeal | None) -> RoundSeal:
    """Sign round ``server_round``'s global adapter, chained to the previous round's seal."""
    unsigned = RoundSeal(run, server_round, adapter_sha256, prev.digest if prev else GENESIS,
                         b"")
    return RoundSeal(run, server_round, adapter_sha256, unsigned.prev,
                     key.sign(unsigned.body()))


def verify_round(seal: RoundSeal, server: ServerPublicKey, *, run: str, server_round: int,
                 adapter_sha256: str, prev_digest: str | None = None) -> None:
    """Refuse (``bad-seal``) unless the aggregator sealed exactly this adapter for this round
    of this run (and, given ``prev_digest``, right after that seal)."""
    server.verify(seal.signature, seal.body())
    if seal.run != run or seal.round != server_round:
        raise Refused("bad-seal", f"the seal is for run {seal.run!r} round {seal.round}; "
                      f"expected run {run!r} round {server_round}")
    if seal.adapter_sha256 != adapter_sha256:
        raise Refused("bad-seal", "the global adapter received is not the one the aggregator "
                      "sealed")
    if prev_digest is not None and seal.prev != prev_digest:
        raise Refused("bad-seal", "the seal does not follow the previous round's seal")
