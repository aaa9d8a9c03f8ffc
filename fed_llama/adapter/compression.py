"""A site's change to the global adapter, quantized for the wire, and back.

A site sends ``state - global`` (its change) rather than its adapter: the change is small and
evenly spread, so a few bits per value keep it. Each tensor's change is cut, flattened, into
blocks of :data:`BLOCK` values; each block is scaled by its largest magnitude (a float16 scale,
rounded up, the codes computed with the scale as stored) and rounded to ``bits``-bit signed
integers: ``int8`` codes in [-127, 127], ``int4`` codes in [-7, 7] packed two to a byte. Per
value that is 8 + 16/128 or 4 + 16/128 bits instead of 32: 25.4% or 12.9% of the float32 bytes.

What rounding leaves out is not lost: the site keeps it (error feedback) and adds it to its
next round's change, so over the rounds the sum of what it sent follows the sum of its
changes (Seide et al. 2014; Karimireddy et al. 2019).

The compressed record holds, per tensor ``name``: ``name`` (the codes: int8, or uint8 pairs
for int4) and ``name`` + :data:`SCALE_SUFFIX` (float16 scales). :func:`decompress` is total
over what a site may send: it returns the adapter or raises ``ValueError`` naming what is
wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fed_llama.adapter.state import State

BLOCK = 128
"""Values sharing one scale."""

SCALE_SUFFIX = "#scale"
"""The name of a tensor's scales in the compressed record (never a peft tensor name)."""

LEVELS = {"int8": 127, "int4": 7}
"""Largest code per scheme."""


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, as (blocks, BLOCK)."""
    pad = (-flat.numel()) % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def quantize(change: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``change`` as (codes, float16 scales) under ``scheme`` (``int8`` or ``int4``)."""
    levels = LEVELS[scheme]
    blocks = _blocks(change.detach().float().flatten())
    scales = _scale_up(blocks.abs().amax(dim=1) / levels)
    # codes are computed with the scale as stored: the decoder multiplies by exactly it
    stored = scales.float()
    safe = torch.where(stored > 0, stored, torch.ones_like(stored))
    codes = torch.round(blocks / safe[:, None]).clamp(-levels, levels).to(torch.int8)
    codes = codes.flatten()[:change.numel()]
    if scheme == "int4":
        codes = _pack(codes)
    return codes, scales


def _scale_up(wanted: torch.Tensor) -> torch.Tensor:
    """The smallest float16 values at least ``wanted`` (non-negative float32; at most
    float16's largest finite value), so that no block's largest value needs a code beyond the
    scheme's largest. Below float16's smallest
    normal (6.1e-5) its subnormals keep about 5e-8 steps: a small block's scale is then coarse
    but still at least what it needs (and what its codes are computed with)."""
    # a block beyond float16's range keeps its largest scale (the codes clamp, error feedback
    # keeps the rest); inf and NaN stay as they are, and decompress refuses them
    top = float(torch.finfo(torch.float16).max)
    wanted = torch.where(torch.isfinite(wanted), wanted.clamp(max=top), wanted)
    half = wanted.to(torch.float16)
    low = half.float() < wanted  # rounded down: take the next float16 up (positive values)
    bits = half.view(torch.int16) + low.to(torch.int16)
    return bits.view(torch.float16)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], scheme: str
               ) -> torch.Tensor:
    """The float32 change of ``shape`` that ``codes`` and ``scales`` encode."""
    numel = math.prod(shape)
    values = _unpack(codes, numel) if scheme == "int4" else codes
    blocks = _blocks(values.float())
    return (blocks * scales.float()[:, None]).flatten()[:numel].view(shape)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes, two per uint8 (low nibble first)."""
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    nibbles = torch.stack([low, high], dim=1).flatten()[:numel].to(torch.int16)
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)


def compress(state: State, current: State, scheme: str, residual: State | None = None
             ) -> tuple[State, State]:
    """``state``'s change from ``current`` (plus the ``residual`` kept from earlier rounds),
    compressed; and the new residual (what this round's rounding left out)."""
    record: State = {}
    left: State = {}
    for name, base in current.items():
        change = state[name].float() - base.float()
        if residual is not None and name in residual:
            change = change + residual[name].float()
        codes, scales = quantize(change, scheme)
        record[name], record[name + SCALE_SUFFIX] = codes, scales
        left[name] = change - dequantize(codes, scales, tuple(change.shape), scheme)
    return record, left


def decompress(record: Mapping[str, object], current: State, scheme: str) -> State:
    """The adapter a compressed record describes: ``current`` plus the decoded change, in
    ``current``'s dtypes. Raises ``ValueError`` for a record that does not fit ``current``
    under ``scheme`` (names, code or scale counts, dtypes)."""
    expected = set(current) | {name + SCALE_SUFFIX for name in current}
    if set(record) != expected:
        missing, extra = sorted(expected - set(record)), sorted(set(record) - expected)
        raise ValueError(f"the compressed update does not fit the adapter: {len(missing)} "
                         f"entries missing (e.g. {missing[:1]}), {len(extra)} unexpected "
                         f"(e.g. {extra[:1]})")
    code_dtype = torch.uint8 if scheme == "int4" else torch.int8
    out: State = {}
    for name, base in current.items():
        codes, scales = record[name], record[name + SCALE_SUFFIX]
        numel = base.numel()
        want_codes = (numel + 1) // 2 if scheme == "int4" else numel
        want_scales = -(-numel // BLOCK)
        if not (isinstance(codes, torch.Tensor) and codes.dtype == code_dtype
                and codes.dim() == 1 and codes.numel() == want_codes):
            raise ValueError(f"{name}: expected {want_codes} {code_dtype} codes")
        if not (isinstance(scales, torch.Tensor) and scales.dtype == torch.float16
                and scales.dim() == 1 and scales.numel() == want_scales):
            raise ValueError(f"{name}: expected {want_scales} float16 scales")
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ValueError(f"{name}: scales must be finite and not negative")
        change = dequantize(codes, scales, tuple(base.shape), scheme)
        out[name] = (base.float() + change).to(base.dtype)
    return out
