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
import re
from dataclasses import dataclass
from typing import Any

from fed_llama.common.bounded_json import BadJson, loads
from fed_llama.crypto.envelope import MAX_ROUND, TensorSpec
from fed_llama.crypto.keys import ServerKey, ServerPublicKey
from fed_llama.crypto.refusal import Refused

GENESIS = "0" * 64
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
        """The seal in a parsed JSON value, or :class:`Refused` (``bad-seal``)."""
        try:
            if not isinstance(data, dict):
                raise TypeError(f"a {type(data).__name__}, not a JSON object")
            fields = [data[k] for k in ("run", "round", "adapter_sha256", "prev", "signature")]
            if not all(isinstance(f, str) for f in fields[:1] + fields[2:]):
                raise TypeError("run, adapter_sha256, prev and signature are texts")
            run, server_round, adapter, prev, signature = fields
            if not isinstance(server_round, int) or isinstance(server_round, bool) or not (
                    0 <= server_round <= MAX_ROUND):
                raise ValueError(f"round {str(server_round)[:20]} is not in [0, {MAX_ROUND}]")
            if len(run) > 1024 or not (_HEX64.fullmatch(adapter) and _HEX64.fullmatch(prev)):
                raise ValueError("run is over 1024 characters, or a digest is not 64 hex digits")
            raw = base64.b64decode(signature, validate=True)
            if len(raw) != 64:
                raise ValueError(f"a signature of {len(raw)} bytes (Ed25519's are 64)")
            return cls(run, server_round, adapter, prev, raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise Refused("bad-seal", f"the round seal cannot be read: {exc}") from None

    @classmethod
    def parse(cls, raw: bytes | str) -> RoundSeal:
        """The seal in JSON text or bytes (a round's config, a seal file), or
        :class:`Refused` (``bad-seal``): total on any input."""
        try:
            data = loads(raw, max_bytes=1 << 16)
        except BadJson as exc:
            raise Refused("bad-seal", f"the round seal is not JSON: {exc}") from None
        return cls.from_json(data)


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
