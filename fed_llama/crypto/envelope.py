"""The envelope a site's update travels in: HPKE-encrypted to the aggregator, signed by the site.

Layout (all of it covered by the site's Ed25519 signature)::

    b"FLLMENV1" | header length (4 bytes, big-endian) | header (canonical JSON) |
    HPKE ciphertext of the update's safetensors bytes | Ed25519 signature (64 bytes)

The header names the run, the round, the site, when it was issued, a random nonce, the KEM and
the update's tensor manifest (name, dtype, shape, sha256 of each tensor). It is the HPKE
``info``, so a ciphertext cannot be moved under another header, and it is signed, so it cannot
be changed. The aggregator checks, in this order: size, layout, site enrolled, signature,
run, round, freshness, nonce not seen, decryption, and that the plaintext is what the header
describes. Each failure raises :class:`Refused` with its reason; nothing else escapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fed_llama.crypto.keys import KEMS, ServerKey, ServerPublicKey, SiteKey, TrustStore
from fed_llama.crypto.refusal import Refused

MAGIC = b"FLLMENV1"
INFO = b"fed-llama update envelope v1\x00"
SIGNATURE_BYTES = 64
MAX_HEADER_BYTES = 1 << 20
_ENC_BYTES = {"x25519": 32, "mlkem768-x25519": 1120}
_TAG_BYTES = 16
_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an update: name, safetensors dtype, shape and sha256 of its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True)
class EnvelopeHeader:
    """What the site signs about its update."""

    run: str
    round: int
    site: str
    issued: float
    nonce: str
    kem: str
    tensors: tuple[TensorSpec, ...]
    ciphertext_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)
    """Numbers the site reports beside the update (examples, train loss): signed, not secret."""

    def encode(self) -> bytes:
        data = {"v": 1, "run": self.run, "round": self.round, "site": self.site,
                "issued": self.issued, "nonce": self.nonce, "kem": self.kem,
                "ciphertext_bytes": self.ciphertext_bytes, "metrics": self.metrics,
                "tensors": [[t.name, t.dtype, list(t.shape), t.sha256] for t in self.tensors]}
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes) -> EnvelopeHeader:
        try:
            d = json.loads(raw.decode("utf-8"))
            if not isinstance(d, dict) or d.get("v") != 1:
                raise ValueError("not a version-1 header")
            tensors = tuple(_tensor(t) for t in d["tensors"])
            header = cls(run=_typed(d["run"], str), round=_typed(d["round"], int),
                         site=_typed(d["site"], str), issued=float(_typed(d["issued"],
                                                                          (int, float))),
                         nonce=_typed(d["nonce"], str), kem=_typed(d["kem"], str),
                         tensors=tensors, ciphertext_bytes=_typed(d["ciphertext_bytes"], int),
                         metrics={_typed(k, str): float(_typed(v, (int, float)))
                                  for k, v in _typed(d.get("metrics", {}), dict).items()})
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise Refused("malformed", f"the envelope header cannot be read: {exc}") from exc
        if header.kem not in KEMS or not math.isfinite(header.issued) or not all(
                math.isfinite(v) for v in header.metrics.values()):
            raise Refused("malformed", f"the envelope header names kem {header.kem!r}, an "
                          "invalid time or a non-finite metric")
        return header


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not of the expected type")
    return value


def _tensor(item: Any) -> TensorSpec:
    name, dtype, shape, digest = item
    return TensorSpec(_typed(name, str), _typed(dtype, str),
                      tuple(_typed(n, int) for n in _typed(shape, list)), _typed(digest, str))


def safetensors_manifest(payload: bytes) -> tuple[TensorSpec, ...]:
    """The tensors of a safetensors file's bytes, sorted by name; refuse anything malformed.

    Checks what a loader relies on: the header length, JSON, known dtypes, non-negative
    shapes, and byte ranges that tile the data area exactly with the right size per tensor.
    """
    if len(payload) < 8:
        raise Refused("malformed", "the update is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > min(len(payload) - 8, MAX_HEADER_BYTES):
        raise Refused("malformed", f"the update's safetensors header claims {n} bytes")
    try:
        header = json.loads(payload[8:8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused("malformed", f"the update's safetensors header is not JSON: {exc}") from exc
    data = memoryview(payload)[8 + n:]
    specs, spans = [], []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = _typed(info["dtype"], str), tuple(_typed(x, int) for x in info["shape"])
            start, end = (_typed(x, int) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Refused("malformed", f"tensor {name!r}: bad safetensors entry ({exc})") from exc
        if dtype not in _DTYPES or any(x < 0 for x in shape):
            raise Refused("malformed", f"tensor {name!r}: dtype {dtype!r} shape {shape}")
        width = 1 if dtype in ("I8", "U8", "BOOL") else int(dtype.strip("FBIU")) // 8
        if not 0 <= start <= end <= len(data) or end - start != width * math.prod(shape):
            raise Refused("malformed", f"tensor {name!r}: byte range {start}..{end} does not "
                          f"fit dtype {dtype} shape {shape}")
        spans.append((start, end))
        specs.append(TensorSpec(name, dtype, shape, hashlib.sha256(data[start:end]).hexdigest()))
    spans.sort()
    if [s for s, _ in spans] != [0, *(e for _, e in spans[:-1])] or (
            spans and spans[-1][1] != len(data)) or (not spans and len(data)):
        raise Refused("malformed", "the update's tensors overlap or leave bytes unaccounted for")
    return tuple(sorted(specs, key=lambda t: t.name))


def seal_envelope(payload: bytes, *, site_key: SiteKey, server: ServerPublicKey, run: str,
                  server_round: int, metrics: dict[str, float] | None = None,
                  clock: Callable[[], float] = time.time, nonce: str | None = None) -> bytes:
    """Encrypt ``payload`` (safetensors bytes) to ``server`` and sign it as ``site_key``,
    with ``metrics`` signed beside it in the clear."""
    header = EnvelopeHeader(
        run=run, round=server_round, site=site_key.site, issued=float(clock()),
        nonce=nonce or os.urandom(16).hex(), kem=server.kem,
        tensors=safetensors_manifest(payload),
        ciphertext_bytes=_ENC_BYTES[server.kem] + len(payload) + _TAG_BYTES,
        metrics={k: float(v) for k, v in (metrics or {}).items()})
    head = header.encode()
    ciphertext = server.encrypt(payload, info=INFO + head)
    if len(ciphertext) != header.ciphertext_bytes:  # the HPKE layout is fixed by RFC 9180
        raise RuntimeError(f"HPKE ciphertext of {len(ciphertext)} bytes; expected "
                           f"{header.ciphertext_bytes}")
    body = MAGIC + struct.pack(">I", len(head)) + head + ciphertext
    return body + site_key.sign(body)


@dataclass
class ReplayGuard:
    """The nonces of envelopes already accepted (kept for the life of the aggregator)."""

    seen: set[tuple[str, str]] = field(default_factory=set)

    def check(self, site: str, nonce: str) -> None:
        if (site, nonce) in self.seen:
            raise Refused("replayed", f"site {site!r} already delivered envelope {nonce[:12]}…")

    def remember(self, site: str, nonce: str) -> None:
        self.seen.add((site, nonce))


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified, decrypted update."""

    header: EnvelopeHeader
    payload: bytes


def open_envelope(data: bytes, *, server_key: ServerKey, trust: TrustStore, run: str,
                  server_round: int, guard: ReplayGuard, max_bytes: int,
                  max_age: float = 3600.0, max_skew: float = 300.0,
                  clock: Callable[[], float] = time.time) -> OpenedEnvelope:
    """Verify and decrypt an envelope for round ``server_round`` of ``run``, or refuse it."""
    if not isinstance(data, (bytes, bytearray)):
        raise Refused("malformed", f"an envelope is bytes; got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise Refused("oversized", f"{len(data)} bytes is over the bound of {max_bytes}")
    fixed = len(MAGIC) + 4
    if len(data) < fixed or data[:len(MAGIC)] != MAGIC:
        raise Refused("malformed", "not a fed-llama update envelope (bad magic)")
    (head_len,) = struct.unpack(">I", data[len(MAGIC):fixed])
    if head_len > MAX_HEADER_BYTES:
        raise Refused("malformed", f"header length {head_len} is over {MAX_HEADER_BYTES}")
    if len(data) < fixed + head_len:
        raise Refused("truncated", f"{len(data)} bytes cannot hold the {head_len}-byte header")
    header = EnvelopeHeader.decode(data[fixed:fixed + head_len])
    expected = fixed + head_len + header.ciphertext_bytes + SIGNATURE_BYTES
    if len(data) < expected:
        raise Refused("truncated", f"{len(data)} bytes; the header says {expected}")
    if len(data) > expected:
        raise Refused("malformed", f"{len(data) - expected} bytes after the signature")
    site = trust.get(header.site)
    body, signature = data[:-SIGNATURE_BYTES], data[-SIGNATURE_BYTES:]
    site.verify(signature, body)
    if header.run != run:
        raise Refused("wrong-run", f"made for run {header.run!r}, this is run {run!r}")
    if header.round < server_round:
        raise Refused("replayed", f"made for round {header.round}, this is round {server_round}")
    if header.round > server_round:
        raise Refused("wrong-round", f"made for round {header.round}, this is round "
                      f"{server_round}")
    now = clock()
    if header.issued < now - max_age or header.issued > now + max_skew:
        raise Refused("stale", f"issued {now - header.issued:.0f} s ago (accepted: up to "
                      f"{max_age:.0f} s ago, {max_skew:.0f} s ahead)")
    guard.check(header.site, header.nonce)
    if header.kem != server_key.kem:
        raise Refused("decrypt-failed", f"encrypted with kem {header.kem!r}; this aggregator "
                      f"uses {server_key.kem!r}")
    payload = server_key.decrypt(data[fixed + head_len:-SIGNATURE_BYTES],
                                 info=INFO + data[fixed:fixed + head_len])
    if safetensors_manifest(payload) != header.tensors:
        raise Refused("payload-mismatch", "the decrypted update is not the one the signed "
                      "header describes")
    guard.remember(header.site, header.nonce)
    return OpenedEnvelope(header, payload)
