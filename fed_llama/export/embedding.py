"""int8 exports: the tied embedding table read from the LM head's 8-bit weights.

Both routes (the builder's graph, and the plain ``torch.onnx`` graph whose LM head
:func:`fed_llama.export.plain.quantize_plain` keeps in 8-bit) get it. In an int8 build the
onnxruntime-genai builder quantizes the LM head (8-bit MatMulNBits,
blocks along the hidden axis) but keeps the embedding lookup as an fp32 ``Gather`` over its own
copy of the table: for this backbone's 49,152 x 576 table that is 113 MB of a 267 MB model,
although with tied embeddings the two are one matrix. :func:`share_tied_embedding` quantizes
that matrix once, symmetric round-to-nearest per block of 32 with the block's largest |w| at
code +-127 (the builder's 8-bit quantizer clips that value a step short, which costs
perplexity), writes it as the LM head's codes, and turns the lookup into onnxruntime's
``GatherBlockQuantized`` over the same codes; the fp32 copy is dropped. Decoding reads one row
of the table per token, so the smaller table buys size, not speed. SmolLM2's GGUF table is
already on such a grid (Q8_0), so on the default backbone both stay exact.

It is applied only when it is the same matrix: every entry of the fp32 table must lie within
one quantization step of the dequantized LM head; an untied model, or a layout it does not
know, keeps its fp32 table and the report says why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fed_llama.export.build import save_graph

log = logging.getLogger(__name__)

EMBED_GATHER = "embed_tokens/Gather"
"""How the embedding lookup's name ends: the builder's ``/model/embed_tokens/Gather``, the
plain route's ``/model/model/embed_tokens/Gather`` (deeper under peft's wrappers)."""
LM_HEAD = "lm_head/MatMul_Q8"
"""How the 8-bit LM head's name ends (``/lm_head/MatMul_Q8``, ``/model/lm_head/MatMul_Q8``)."""


def dequantize_int8_head(codes: np.ndarray, scales: np.ndarray,
                         zero_points: np.ndarray | None = None) -> np.ndarray:
    """``[N, K]`` weights of an 8-bit MatMulNBits: codes ``[N, blocks, block]`` (uint8),
    scales ``[N, blocks]``, zero points ``[N, blocks]`` (default 128)."""
    zp = (np.full(scales.shape, 128, np.float32) if zero_points is None
          else zero_points.reshape(scales.shape).astype(np.float32))
    w = (codes.astype(np.float32) - zp[..., None]) * scales[..., None]
    return w.reshape(codes.shape[0], -1)


def quantize_int8_rtn(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit round-to-nearest of ``table`` ``[N, K]`` in blocks of ``block`` along K:
    codes ``[N, K/block, block]`` (uint8, zero point 128) and scales ``[N, K/block]``."""
    blocks = table.reshape(table.shape[0], -1, block).astype(np.float32)
    scales = np.abs(blocks).max(axis=-1) / 127
    safe = np.where(scales > 0, scales, 1.0)
    codes = np.clip(np.round(blocks / safe[..., None]), -127, 127) + 128
    return codes.astype(np.uint8), scales.astype(np.float32)


def share_tied_embedding(onnx_file: Path) -> dict[str, Any]:
    """Rewrite ``onnx_file`` (an int8 build) in place so that the embedding lookup reads the
    LM head's 8-bit weights; returns what the manifest records (``embedding``: ``int8-shared``
    or ``fp32`` with the ``reason``, and the MB saved)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_file))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.name.endswith(EMBED_GATHER)), None)
    head = next((n for n in graph.node if n.name.endswith(LM_HEAD)), None)

    def kept(reason: str) -> dict[str, Any]:
        log.info("int8 export: the embedding table stays fp32 (%s)", reason)
        return {"embedding": "fp32", "reason": reason}

    if gather is None or gather.op_type != "Gather" or gather.input[0] not in inits:
        return kept("no fp32 embedding Gather in the graph")
    if sum(gather.input[0] in n.input for n in graph.node) > 1:
        return kept("the fp32 table is read by other nodes too")
    if head is None or head.op_type != "MatMulNBits":
        return kept("no 8-bit LM head in the graph")
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    table = numpy_helper.to_array(inits[gather.input[0]])
    codes = numpy_helper.to_array(inits[head.input[1]])
    scales = numpy_helper.to_array(inits[head.input[2]])
    zp_name = head.input[3] if len(head.input) > 3 and head.input[3] else None
    zero_points = numpy_helper.to_array(inits[zp_name]) if zp_name else None
    block = int(attrs.get("block_size", 0))
    if attrs.get("bits") != 8 or codes.ndim != 3 or codes.shape[2] != block:
        return kept(f"LM head layout {dict(attrs)} is not 8-bit blocks")
    if table.shape != (attrs["N"], attrs["K"]) or attrs["K"] % block:
        return kept(f"table {table.shape} does not match the LM head {attrs['N']}x{attrs['K']} "
                    f"in whole blocks of {block}")
    step = np.abs(np.repeat(scales.reshape(table.shape[0], -1), block, axis=1))  # signed scales
    error = np.abs(dequantize_int8_head(codes, scales, zero_points) - table)
    # round-to-nearest is within half a step; a quantizer that clips the block's largest
    # value to code 255 (scale = max|w| / 128) is one step off there
    if not np.all(error <= step * (1 + 1e-3) + 1e-7):
        return kept("the embedding is not tied to the LM head")

    # one 8-bit copy for both: round-to-nearest with each block's largest |w| at code +-127,
    # written over the builder's LM head codes (its quantizer clips that value one step short)
    codes, scales = quantize_int8_rtn(table, block)
    for name, array in ((head.input[1], codes), (head.input[2], scales)):
        dtype = helper.tensor_dtype_to_np_dtype(inits[name].data_type)
        inits[name].CopyFrom(numpy_helper.from_array(
            array.reshape(tuple(inits[name].dims)).astype(dtype), name))
    if zp_name:
        inits[zp_name].CopyFrom(numpy_helper.from_array(
            np.full(tuple(inits[zp_name].dims), 128, np.uint8), zp_name))
    shape_name = f"{gather.name}/codes_shape"
    graph.initializer.append(numpy_helper.from_array(np.array(table.shape, np.int64),
                                                     shape_name))
    reshape = helper.make_node("Reshape", [head.input[1], shape_name],
                               [f"{gather.name}/codes"], name=f"{gather.name}/Reshape")
    quantized = helper.make_node(
        "GatherBlockQuantized",
        [f"{gather.name}/codes", gather.input[1], head.input[2], *([zp_name] if zp_name else [])],
        list(gather.output), name=f"{gather.name}Q8", domain="com.microsoft",
        gather_axis=0, quantize_axis=1, block_size=block, bits=8)
    ordered = list(graph.node)
    at = ordered.index(gather)
    ordered[at:at + 1] = [reshape, quantized]
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.remove(inits[gather.input[0]])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_graph(model, onnx_file)
    saved = table.nbytes / 1e6
    log.info("int8 export: embedding lookup shares the LM head's 8-bit weights (%.0f MB saved)",
             saved)
    return {"embedding": "int8-shared", "saved_mb": round(saved, 1)}
