"""Calibrated int4: GPTQ on the decoder's projections, written into the builder's MatMulNBits.

Round-to-nearest int4 rounds every weight on its own. GPTQ (Frantar et al., 2023) quantizes a
weight matrix one input column at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian ``H = 2·XᵀX`` of the layer's inputs
``X`` on calibration data, so the layer's *outputs* on that data move as little as possible.

Here the calibration inputs are recorded with forward hooks on the PyTorch merged model (one
pass over the calibration records), every decoder projection is quantized (q, k and v together
where the builder's graph packs them into one ``qkv_proj``; gate and up together where it fuses
them into ``gate_up_proj``), and the codes, scales and zero points are written over the 4-bit
``MatMulNBits`` weights of the graph: the onnxruntime-genai builder's, or the plain
``torch.onnx`` route's quantized asymmetrically (one projection per node). In LLaMA-Adapter
graphs the branch's second use of a projection (the prompts through ``k_proj``/``v_proj``,
V1's ``o_proj`` on the branch output) reads the token path's blocks
(:func:`fed_llama.export.plain.share_quantized_weights`): only the token path is calibrated
(and recorded), and its codes serve both uses.
The grid is exactly MatMulNBits' (asymmetric, one fp32 scale and a 4-bit zero point per block of
``block_size`` input weights), so nothing is re-rounded on the way in. The tied embedding /
LM head and projections kept in 8-bit (``mixed_precision``) are left as the builder made them.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fed_llama.errors import FedLlamaError
from fed_llama.export.build import save_graph

log = logging.getLogger(__name__)

#: ONNX projection (``/model/layers.N/<group>``) -> the Hugging Face modules packed into it, in
#: output order. Modules of one group share their input, hence their Hessian. The builder's
#: graph has ``qkv_proj`` and, where it fused them, ``gate_up_proj``; the plain route's has
#: ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj`` and ``up_proj``.
GROUPS: dict[str, tuple[str, ...]] = {
    "attn/qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn/q_proj": ("self_attn.q_proj",),
    "attn/k_proj": ("self_attn.k_proj",),
    "attn/v_proj": ("self_attn.v_proj",),
    "attn/o_proj": ("self_attn.o_proj",),
    "mlp/gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp/gate_proj": ("mlp.gate_proj",),
    "mlp/up_proj": ("mlp.up_proj",),
    "mlp/down_proj": ("mlp.down_proj",),
}
#: A 4-bit projection node of either graph: the builder's ``/model/layers.3/attn/qkv_proj/``,
#: the plain route's ``/model/model/layers.3/self_attn/q_proj/`` (``.../self_attn/model/q_proj``
#: under peft's LLaMA-Adapter, ``.../self_attn/k_proj_1`` where a method's prompts go through
#: the projection a second time).
NODE = re.compile(
    r"layers\.(\d+)/(attn|self_attn|mlp)/(?:model/)?([a-z_]+_proj)(?:_\d+)?/MatMul_Q4$")
#: Fractions of a block's range tried for its grid (the one with the least error is kept).
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)


class GptqError(FedLlamaError):
    """The calibrated quantization could not be applied to the exported graph."""


@dataclass
class Quantized:
    """A weight matrix ``[N, K]`` on an asymmetric block-wise grid along K."""

    codes: np.ndarray
    """uint8 ``[N, K]``, each in ``[0, 2**bits)``."""
    scales: np.ndarray
    """float32 ``[N, K // block_size]``."""
    zeros: np.ndarray
    """uint8 ``[N, K // block_size]``: the code of 0.0."""
    block_size: int

    def dequantize(self) -> np.ndarray:
        """``(code - zero) · scale`` as float32 ``[N, K]``."""
        rep = np.repeat
        return ((self.codes.astype(np.float32) - rep(self.zeros, self.block_size, axis=1))
                * rep(self.scales, self.block_size, axis=1)).astype(np.float32)


def _grid(w: Any, bits: int) -> tuple[Any, Any]:
    """Scale and zero point per row of ``w`` (``[N, block]``, torch), least squared error over
    the candidate ranges in :data:`SHRINK`; the range always holds 0 so the zero is a code."""
    import torch

    top = 2 ** bits - 1
    lo = torch.clamp(w.min(dim=1).values, max=0.0)
    hi = torch.clamp(w.max(dim=1).values, min=0.0)
    best_err = torch.full_like(lo, float("inf"))
    best_scale = torch.ones_like(lo)
    best_zero = torch.zeros_like(lo)
    for p in SHRINK:
        scale = ((hi - lo) * p / top).clamp(min=1e-12)
        zero = torch.round(-lo * p / scale).clamp(0, top)
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, top)
        err = ((q - zero[:, None]) * scale[:, None] - w).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq(weight: Any, hessian: Any, *, bits: int = 4, block_size: int = 32,
         damp: float = 0.01, lazy_block: int = 128) -> Quantized:
    """GPTQ of ``weight`` (``[N, K]`` torch, rows = outputs) given its inputs' ``hessian``
    (``[K, K]``): each block of ``block_size`` columns gets its grid when it is reached (after
    the error of the earlier columns was spread into it). ``damp``: fraction of the mean
    Hessian diagonal added to it for a stable inverse."""
    import torch

    n, k = weight.shape
    if k % block_size:
        raise GptqError(f"GPTQ needs the input size {k} to be a multiple of block_size "
                        f"{block_size}: choose a block_size that divides {k}")
    top = 2 ** bits - 1
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros((n, k), dtype=torch.float64)
    scales = torch.zeros((n, k // block_size), dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    lazy = max(block_size, lazy_block // block_size * block_size)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                scale, zero = _grid(w1[:, i:i + block_size], bits)
                scales[:, col // block_size], zeros[:, col // block_size] = scale, zero
            scale, zero = scales[:, col // block_size], zeros[:, col // block_size]
            q = torch.clamp(torch.round(w1[:, i] / scale) + zero, 0, top)
            codes[:, col] = q
            err = (w1[:, i] - (q - zero) * scale) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return Quantized(codes=codes.numpy().astype(np.uint8),
                     scales=scales.numpy().astype(np.float32),
                     zeros=zeros.numpy().astype(np.uint8), block_size=block_size)


def decoder_layers(model: Any) -> Any:
    """The decoder layers of a Hugging Face LLaMA, also under an adapter method's wrapper
    (peft's ``base_model.model.model.layers``)."""
    import torch

    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, torch.nn.ModuleList):
            return module
    raise GptqError(f"{type(model).__name__} has no decoder layers to calibrate: use "
                    "algorithm = 'default'")


def projection(layer: Any, name: str) -> Any:
    """``layer``'s projection ``name`` (``self_attn.q_proj``), also where peft's LLaMA-Adapter
    wraps the attention (``self_attn.model.q_proj``)."""
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return layer.get_submodule(name.replace("self_attn.", "self_attn.model.", 1))


def collect_hessians(model: Any, sequences: Sequence[Sequence[int]], keys: set[str],
                     progress: Callable[[Any], Any] = iter) -> dict[str, Any]:
    """``2·XᵀX / n`` of the input ``X`` of the projections named in ``keys`` (``"<layer>/<group>"``
    of :data:`GROUPS`, e.g. ``"3/mlp/down_proj"``: the graph's own, as a graph holds either the
    fused ``gate_up_proj`` or ``gate_proj`` and ``up_proj``) of the Hugging Face ``model``, over
    ``sequences`` of token ids; keyed like ``keys``."""
    import torch

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []

    seen: set[str] = set()

    def hook(key: str) -> Callable[..., None]:
        def record(_module: Any, args: tuple[Any, ...]) -> None:
            # the first call of a forward pass is the token path the 4-bit node computes; an
            # adapter method's branch may call the projection again (prompts, V1's o_proj on
            # the branch output), and those uses stay fp32 in the graph
            if key in seen:
                return
            seen.add(key)
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[key] = sums.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]
        return record

    for i, layer in enumerate(decoder_layers(model)):
        for group, modules in GROUPS.items():
            if f"{i}/{group}" in keys:
                hooks.append(projection(layer, modules[0]).register_forward_pre_hook(
                    hook(f"{i}/{group}")))
    try:
        with torch.no_grad():
            for ids in progress(sequences):
                seen.clear()
                model(torch.tensor([list(ids)]), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return {key: (2 * total / counts[key]).double() for key, total in sums.items()}


def pack(q: Quantized) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' 4-bit layout: ``B`` uint8 ``[N, blocks, block_size/2]`` (two codes a byte,
    the first in the low nibble), ``scales`` float32 ``[N, blocks]``, zero points uint8
    ``[N, ceil(blocks/2)]`` (two a byte, likewise)."""
    n, k = q.codes.shape
    blocks = k // q.block_size
    codes = q.codes.reshape(n, blocks, q.block_size)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    zeros = q.zeros if blocks % 2 == 0 else np.pad(q.zeros, ((0, 0), (0, 1)))
    zp = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)
    return packed, q.scales.astype(np.float32), zp


def unpack(b: np.ndarray, scales: np.ndarray, zp: np.ndarray) -> Quantized:
    """The inverse of :func:`pack` (to read what a graph holds)."""
    n, blocks, half = b.shape
    codes = np.empty((n, blocks, 2 * half), dtype=np.uint8)
    codes[..., 0::2], codes[..., 1::2] = b & 0x0F, b >> 4
    zeros = np.empty((n, 2 * zp.shape[1]), dtype=np.uint8)
    zeros[:, 0::2], zeros[:, 1::2] = zp & 0x0F, zp >> 4
    return Quantized(codes=codes.reshape(n, blocks * 2 * half), scales=scales.reshape(n, blocks),
                     zeros=zeros[:, :blocks], block_size=2 * half)


def output_error(weight: np.ndarray, q: Quantized, hessian: np.ndarray) -> float:
    """``tr(E·H·Eᵀ) / tr(W·H·Wᵀ)`` with ``E = W - dequantized``: the layer's squared output
    error on the calibration data relative to its output energy."""
    e = weight.astype(np.float64) - q.dequantize()
    w = weight.astype(np.float64)
    return float(np.sum((e @ hessian) * e) / max(np.sum((w @ hessian) * w), 1e-30))


def calibrate_graph(model: Any, sequences: Sequence[Sequence[int]], onnx_file: Path, *,
                    block_size: int, damp: float = 0.01) -> dict[str, Any]:
    """GPTQ every 4-bit decoder projection of ``onnx_file`` (built from ``model``, the PyTorch
    merged model) on ``sequences`` and write it back in place; returns a report: matrices
    changed, calibration tokens, and the mean relative output error before
    (``output_error_builder``: the graph as built, by the builder's quantizer or, on the plain
    route, onnxruntime's round-to-nearest) and after."""
    import onnx
    import torch
    from onnx import numpy_helper
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    for layer in layers:
        for group, modules in GROUPS.items():
            k = projection(layer, modules[0]).in_features
            if k % block_size:
                raise GptqError(f"algorithm = 'gptq' needs block_size to divide every input size "
                                f"({group} has {k}); block_size = {block_size} does not: "
                                "use 16, 32 or 64")
    graph = onnx.load(str(onnx_file))
    inits = {t.name: t for t in graph.graph.initializer}
    # the 4-bit projections, by "<layer>/<group>"; those kept in 8-bit (mixed precision) are
    # left as built
    four_bit: dict[str, list[Any]] = {}
    for node in graph.graph.node:
        found = NODE.search(node.name) if node.op_type == "MatMulNBits" else None
        if found:
            key = f"{found[1]}/{'mlp' if found[2] == 'mlp' else 'attn'}/{found[3]}"
            if key.split("/", 1)[1] in GROUPS and int(found[1]) < len(layers):
                four_bit.setdefault(key, []).append(node)
    log.info("GPTQ: recording the inputs of %d projections on %d calibration records",
             len(four_bit), len(sequences))
    hessians = collect_hessians(model, sequences, set(four_bit),
                                lambda s: tqdm(s, desc="GPTQ calibration", unit="record",
                                               leave=False, disable=None))
    keys = sorted(hessians, key=lambda k: (int(k.split("/")[0]), k))  # layer by layer
    per_layer = Counter(int(k.split("/")[0]) for k in keys)
    log.info("GPTQ: quantizing %d matrices in %d layers", len(keys), len(per_layer))
    # a bar on a terminal; a log line per layer where there is none (a log file, a pipe)
    bar = tqdm(keys, desc="GPTQ", unit="matrix", leave=False, disable=None)
    before, after, changed = [], [], 0
    for key in bar:
        layer, group = key.split("/", 1)
        mods = [projection(layers[int(layer)], m) for m in GROUPS[group]]
        weight = torch.cat([m.weight.detach().float() for m in mods], dim=0)
        for node in four_bit[key]:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if (attrs.get("bits") != 4 or attrs.get("block_size") != block_size
                    or len(node.input) < 4):
                raise GptqError(f"{node.name} is not a 4-bit, block-{block_size} MatMulNBits "
                                f"with zero points ({attrs}): rebuild without calibration")
            if tuple(weight.shape) != (attrs["N"], attrs["K"]):
                raise GptqError(f"{node.name} is {attrs['N']}x{attrs['K']} but the PyTorch "
                                f"weights are {tuple(weight.shape)}: the graph was not built "
                                "from this model")
        h = hessians[key].numpy()
        b_name, s_name, z_name = four_bit[key][0].input[1:4]
        built = unpack(numpy_helper.to_array(inits[b_name]),
                       numpy_helper.to_array(inits[s_name]), numpy_helper.to_array(inits[z_name]))
        q = gptq(weight, hessians[key], block_size=block_size, damp=damp)
        w = weight.numpy()
        before.append(output_error(w, built, h))
        after.append(output_error(w, q, h))
        for node in four_bit[key]:  # one weight, one set of codes (a prompt path's node too)
            for name, array in zip(node.input[1:4], pack(q), strict=True):
                inits[name].CopyFrom(numpy_helper.from_array(
                    array.reshape(tuple(inits[name].dims)), name))
        changed += 1
        per_layer[int(layer)] -= 1
        if not per_layer[int(layer)]:
            bar.set_postfix_str(f"layer {layer} done")
            log.log(logging.INFO if bar.disable else logging.DEBUG,
                    "GPTQ: layer %s done (%d of %d matrices)", layer, changed, len(keys))
    bar.close()
    save_graph(graph, onnx_file)
    report = {"algorithm": "gptq", "matrices": changed, "damp": damp,
              "calibration_records": len(sequences),
              "calibration_tokens": sum(len(s) for s in sequences),
              "output_error_builder": float(np.mean(before)) if before else None,
              "output_error_gptq": float(np.mean(after)) if after else None}
    log.info("GPTQ: %d matrices; mean relative output error %.4g (as built) -> %.4g",
             changed, report["output_error_builder"] or 0.0, report["output_error_gptq"] or 0.0)
    return report
