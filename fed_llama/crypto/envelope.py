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

from fed_llama.common.bounded_json import loads
from fed_llama.crypto.keys import KEMS, ServerKey, ServerPublicKey, SiteKey, TrustStore
from fed_llama.crypto.refusal import Refused

MAGIC = b"FLLMENV1"
INFO = b"fed-llama update envelope v1\x00"
SIGNATURE_BYTES = 64
MAX_HEADER_BYTES = 1 << 20
_ENC_BYTES = {"x25519": 32, "mlkem768-x25519": 1120}
_TAG_BYTES = 16
_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
MAX_ROUND = 1 << 31
"""Largest round number a header may name."""
MAX_PAYLOAD_BYTES = 1 << 40
"""Largest ciphertext a header may announce (the aggregator's size bound refuses far less)."""
MAX_DIM, MAX_RANK = 1 << 40, 8
"""Largest tensor dimension and number of dimensions in a manifest."""
MAX_TEXT_CHARS = 1024
"""Longest text field (run id, site, nonce, tensor name) in a header."""
MAX_METRICS = 256
"""Most metrics a site may report beside its update."""
MAX_METRIC = 1e18
"""Largest magnitude of a reported number or issue time."""


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
        """The header in ``raw``, or :class:`Refused` (``malformed``): total on any bytes."""
        try:
            d = loads(raw, max_bytes=MAX_HEADER_BYTES)
            if not isinstance(d, dict) or d.get("v") != 1:
                raise ValueError("not a version-1 header")
            metrics = _typed(d.get("metrics", {}), dict)
            if len(metrics) > MAX_METRICS:
                raise ValueError(f"{len(metrics)} metrics (at most {MAX_METRICS})")
            header = cls(run=_text(d["run"], "run"),
                         round=_bounded(d["round"], 0, MAX_ROUND, "round"),
                         site=_text(d["site"], "site"),
                         issued=_number(d["issued"], "issued"),
                         nonce=_text(d["nonce"], "nonce"), kem=_text(d["kem"], "kem"),
                         tensors=tuple(_tensor(t) for t in _typed(d["tensors"], list)),
                         ciphertext_bytes=_bounded(d["ciphertext_bytes"], 0, MAX_PAYLOAD_BYTES,
                                                   "ciphertext_bytes"),
                         metrics={_text(k, "metric name"): _number(v, f"metric {k[:40]!r}")
                                  for k, v in metrics.items()})
        except (ValueError, KeyError, TypeError) as exc:  # BadJson is a ValueError
            raise Refused("malformed", f"the envelope header cannot be read: {exc}") from None
        if header.kem not in KEMS:
            raise Refused("malformed", f"the envelope header names kem {header.kem[:40]!r}")
        return header


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"a {type(value).__name__} where a {_names(kind)} belongs")
    return value


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def _text(value: Any, what: str) -> str:
    text: str = _typed(value, str)
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{what}: a text of {len(text)} characters (at most "
                         f"{MAX_TEXT_CHARS})")
    return text


def _bounded(value: Any, low: int, high: int, what: str) -> int:
    number: int = _typed(value, int)
    if not low <= number <= high:
        raise ValueError(f"{what}: {number} is outside [{low}, {high}]")
    return number


def _number(value: Any, what: str) -> float:
    """A finite number within +-MAX_METRIC (the JSON parser has bounded its digits)."""
    number = float(_typed(value, (int, float)))
    if not abs(number) <= MAX_METRIC:
        raise ValueError(f"{what}: {number:.3g} is outside +-{MAX_METRIC:.0e}")
    return number


def _tensor(item: Any) -> TensorSpec:
    name, dtype, shape, digest = _typed(item, list)
    dims = tuple(_bounded(n, 0, MAX_DIM, "tensor dimension") for n in _typed(shape, list))
    if len(dims) > MAX_RANK:
        raise ValueError(f"a tensor of {len(dims)} dimensions (at most {MAX_RANK})")
    return TensorSpec(_text(name, "tensor name"), _text(dtype, "tensor dtype"), dims,
                      _text(digest, "tensor sha256"))


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
        header = loads(payload[8:8 + n], max_bytes=MAX_HEADER_BYTES)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as exc:  # BadJson is a ValueError
        raise Refused("malformed", f"the update's safetensors header is not JSON: {exc}") from None
    data = memoryview(payload)[8 + n:]
    specs, spans = [], []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise Refused("malformed", "the update's safetensors __metadata__ is not a "
                              "table of texts")
            continue
        try:
            entry = _typed(info, dict)
            dtype = _typed(entry["dtype"], str)
            shape = tuple(_bounded(x, 0, MAX_DIM, "shape") for x in _typed(entry["shape"], list))
            start, end = (_bounded(x, 0, len(data), "data_offsets")
                          for x in _typed(entry["data_offsets"], list))
            if len(shape) > MAX_RANK:
                raise ValueError(f"{len(shape)} dimensions (at most {MAX_RANK})")
        except (KeyError, TypeError, ValueError) as exc:
            raise Refused("malformed", f"tensor {name[:80]!r}: bad safetensors entry "
                          f"({exc})") from None
        if dtype not in _DTYPES or any(x < 0 for x in shape):
            raise Refused("malformed", f"tensor {name[:80]!r}: dtype {dtype[:20]!r} shape "
                          f"{shape}")
        width = 1 if dtype in ("I8", "U8", "BOOL") else int(dtype.strip("FBIU")) // 8
        if not 0 <= start <= end <= len(data) or end - start != width * math.prod(shape):
            raise Refused("malformed", f"tensor {name[:80]!r}: byte range {start}..{end} does not "
                          f"fit dtype {dtype} shape {shape}")
        spans.append((start, end))
        specs.append(TensorSpec(name, dtype, shape, hashlib.sha256(data[start:end]).hexdigest()))
    spans.sort()
    if [s for s, _ in spans] != [0, *(e for _, e in spans[:-1])] or (
            spans and spans[-1][1] != len(data)) or (not spans and len(data)):
        raise Refused("malformed", "the update's tensors overlap or leave bytes unaccounted for")
    return tuple(sorted(specs, key=lambda t: t.name))


def make_envelope(payload: bytes, *, site_key: SiteKey, server: ServerPublicKey, run: str,
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
