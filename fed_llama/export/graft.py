"""Graft the branches that do not fold (V1/V2 prompts, the Excitor's keys) onto the
onnxruntime-genai builder's graph, so those methods keep its fast path: fused
GroupQueryAttention with rotary position and the in-place KV cache, and its block-wise int8/int4.

The builder reads the backbone's projection weights only; what an adapter adds beside them is
a handful of constants per adapted layer, computed here once from the PyTorch model
(:func:`branch_constants`) and wired around the layer's ``GroupQueryAttention`` node
(:func:`graft_branches`):

* **Adaption prompts** (LLaMA-Adapter V1, V2): the prompt keys ``K_P = k_proj(P)`` and values
  ``V_P = v_proj(P)`` do not depend on the input, so they are constants, the keys scaled by
  ``1/√d`` and the values by the head's gate (``tanh(g)`` for ours, peft's scalar ``g`` for
  V1), one copy per query head (grouped KV heads repeated). The graph slices the query out of
  the packed QKV projection, rotates it as GroupQueryAttention does (same cos/sin caches, the
  same positions: ``0..S-1`` on the first prompt, ``past + s`` after it) and adds
  ``softmax(Q·K_Pᵀ/√d)·(gate·V_P)`` to the attention output before ``o_proj``. peft adds V1's
  branch after ``o_proj``; ``o_proj`` has no bias, so the sum is the same.
* **Excitor keys**: ``K_extra = softmax(x·M)·C`` for the layer's normed input ``x``, with
  ``M = A_q·(P·A_k)ᵀ/√r`` and ``C = P·W_down·W_up`` times ``tanh(g)`` per KV head, both
  constants. ``C`` is laid out over the packed QKV width (zero outside the key columns), so
  the graph adds ``softmax(x·M)·C`` to the packed projection before GroupQueryAttention, which
  rotates the modified keys and stores them in the KV cache, as the PyTorch layer does.

The constants stay fp32 beside the builder's quantized projections (their size is a few
prompt vectors per layer), so an int8 or int4 graph quantizes the backbone only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fed_llama.export.branches import SLOT, Branch, KeyBranch, PromptBranch, packed_keys
from fed_llama.export.build import ExportError, save_graph

PROMPT = "prompts"
KEYS = "keys"
ATTENTION = "/model/layers.{}/attn/GroupQueryAttention"
NORM = "/model/layers.{}/input_layernorm/"


def graft_branches(onnx_file: Path, branches: list[Branch]) -> dict[str, Any]:
    """Wire ``branches`` into the builder graph ``onnx_file`` in place; returns what the
    manifest records. Raises :class:`ExportError` when the graph is not laid out as the
    builder lays it out (a GroupQueryAttention with rotary position per layer)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_file))
    graph = model.graph
    nodes = list(graph.node)
    constants: list[Any] = []

    def const(name: str, array: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(array, name))
        return name

    position_name = ""
    inserted: dict[int, tuple[list[Any], list[Any]]] = {}  # node index -> (before, after)
    for branch in branches:
        attn_name = ATTENTION.format(branch.layer)
        at = next((i for i, n in enumerate(nodes) if n.name == attn_name), None)
        if at is None or nodes[at].op_type != "GroupQueryAttention":
            raise ExportError(f"the builder's graph has no {attn_name}: the "
                              f"{type(branch).__name__} of layer {branch.layer} cannot be "
                              "grafted (set exporter = 'torch')")
        gqa = nodes[at]
        attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
        heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
        packed = len(gqa.input) < 2 or not gqa.input[1]
        prefix = f"/model/layers.{branch.layer}/attn/graft"

        def name_of(what: str, layer: int = branch.layer) -> str:
            return SLOT.format(layer, what)

        before, after = inserted.setdefault(at, ([], []))
        if isinstance(branch, KeyBranch):
            norm = next((n for n in nodes if n.name.startswith(NORM.format(branch.layer))),
                        None)
            if norm is None:
                raise ExportError(f"the builder's graph has no input norm in layer "
                                  f"{branch.layer}: its Excitor keys cannot be grafted")
            head_dim = branch.keys.shape[1] // kv_heads
            width = (heads + 2 * kv_heads) * head_dim if packed else kv_heads * head_dim
            keys = packed_keys(branch, width)
            slot = 0 if packed else 1
            before += [
                helper.make_node("MatMul", [norm.output[0], const(name_of("affinity"),
                                                                  branch.affinity)],
                                 [f"{prefix}/scores"], name=f"{prefix}/Scores"),
                helper.make_node("Softmax", [f"{prefix}/scores"], [f"{prefix}/weights"],
                                 name=f"{prefix}/Softmax", axis=-1),
                helper.make_node("MatMul", [f"{prefix}/weights", const(name_of("keys"), keys)],
                                 [f"{prefix}/extra"], name=f"{prefix}/Extra"),
                helper.make_node("Add", [gqa.input[slot], f"{prefix}/extra"],
                                 [f"{prefix}/qkv"], name=f"{prefix}/AddKeys"),
            ]
            gqa.input[slot] = f"{prefix}/qkv"
            continue
        if not attrs.get("do_rotary"):
            raise ExportError(f"{attn_name} does not rotate its queries itself: its prompt "
                              "branch cannot be grafted (set exporter = 'torch')")
        head_dim = branch.keys.shape[1]
        if not position_name:
            position_name = "/model/graft/positions"
            before[:0] = _position_nodes(gqa.input[5], gqa.input[6], position_name, const)
        query = gqa.input[0]
        if packed:
            before.append(helper.make_node(
                "Slice", [gqa.input[0], const(f"{prefix}/q_start", np.array([0], np.int64)),
                          const(f"{prefix}/q_end", np.array([heads * head_dim], np.int64)),
                          const(f"{prefix}/q_axis", np.array([2], np.int64))],
                [f"{prefix}/q"], name=f"{prefix}/SliceQ"))
            query = f"{prefix}/q"
        out = gqa.output[0]
        after += [
            helper.make_node("RotaryEmbedding", [query, position_name, gqa.input[7],
                                                 gqa.input[8]],
                             [f"{prefix}/q_rot"], name=f"{prefix}/Rotary",
                             domain="com.microsoft", interleaved=int(attrs.get(
                                 "rotary_interleaved", 0))),
            helper.make_node("Reshape", [f"{prefix}/q_rot", const(
                f"{prefix}/heads_shape", np.array([0, 0, heads, head_dim], np.int64))],
                [f"{prefix}/q_heads"], name=f"{prefix}/SplitHeads"),
            helper.make_node("Transpose", [f"{prefix}/q_heads"], [f"{prefix}/q_bhsd"],
                             name=f"{prefix}/HeadsFirst", perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [f"{prefix}/q_bhsd", const(name_of("prompt_keys"),
                                                                  branch.keys)],
                             [f"{prefix}/scores"], name=f"{prefix}/Scores"),
            helper.make_node("Softmax", [f"{prefix}/scores"], [f"{prefix}/weights"],
                             name=f"{prefix}/Softmax", axis=-1),
            helper.make_node("MatMul", [f"{prefix}/weights", const(name_of("prompt_values"),
                                                                   branch.values)],
                             [f"{prefix}/context"], name=f"{prefix}/Context"),
            helper.make_node("Transpose", [f"{prefix}/context"], [f"{prefix}/context_bshd"],
                             name=f"{prefix}/TokensFirst", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{prefix}/context_bshd", const(
                f"{prefix}/merged_shape", np.array([0, 0, heads * head_dim], np.int64))],
                [f"{prefix}/prompt_out"], name=f"{prefix}/MergeHeads"),
            helper.make_node("Add", [out, f"{prefix}/prompt_out"], [f"{prefix}/attn_out"],
                             name=f"{prefix}/AddPrompts"),
        ]
        for node in nodes:  # o_proj (and anything else) reads the sum
            if node is gqa:
                continue
            for i, name in enumerate(node.input):
                if name == out:
                    node.input[i] = f"{prefix}/attn_out"
    ordered: list[Any] = []
    for i, node in enumerate(nodes):
        before, after = inserted.get(i, ([], []))
        ordered += [*before, node, *after]
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(constants)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_graph(model, onnx_file)
    return {"grafted": {PROMPT: sum(isinstance(b, PromptBranch) for b in branches),
                        KEYS: sum(isinstance(b, KeyBranch) for b in branches)},
            "graft_constants_mb": round(sum(b.keys.nbytes + (b.values.nbytes if isinstance(
                b, PromptBranch) else b.affinity.nbytes) for b in branches) / 1e6, 3)}


def _position_nodes(seqlens_k: str, total: str, out: str, const: Any) -> list[Any]:
    """Nodes computing the positions GroupQueryAttention rotates with: ``0..S-1`` on the first
    prompt (total length = S), else ``seqlens_k + 1 - S + s`` (``seqlens_k`` = each row's
    length - 1)."""
    from onnx import TensorProto, helper

    p = "/model/graft/pos"
    one, zero = const(f"{p}/one", np.array(1, np.int64)), const(f"{p}/zero", np.array(0, np.int64))
    return [
        helper.make_node("Cast", [seqlens_k], [f"{p}/seqlens"], name=f"{p}/CastSeqlens",
                         to=TensorProto.INT64),
        helper.make_node("Cast", [total], [f"{p}/total"], name=f"{p}/CastTotal",
                         to=TensorProto.INT64),
        helper.make_node("Shape", ["input_ids"], [f"{p}/ids_shape"], name=f"{p}/Shape"),
        helper.make_node("Gather", [f"{p}/ids_shape", one], [f"{p}/length"],
                         name=f"{p}/Length", axis=0),
        helper.make_node("Equal", [f"{p}/total", f"{p}/length"], [f"{p}/first"],
                         name=f"{p}/First"),
        helper.make_node("Add", [f"{p}/seqlens", one], [f"{p}/rows"], name=f"{p}/Rows"),
        helper.make_node("Sub", [f"{p}/rows", f"{p}/length"], [f"{p}/past"], name=f"{p}/Past"),
        helper.make_node("Where", [f"{p}/first", zero, f"{p}/past"], [f"{p}/offset"],
                         name=f"{p}/Offset"),
        helper.make_node("Unsqueeze", [f"{p}/offset", const(f"{p}/axis1", np.array([1], np.int64))],
                         [f"{p}/offset_b1"],
                         name=f"{p}/OffsetColumn"),
        helper.make_node("Range", [zero, f"{p}/length", one], [f"{p}/steps"],
                         name=f"{p}/Steps"),
        helper.make_node("Add", [f"{p}/offset_b1", f"{p}/steps"], [out], name=f"{p}/Positions"),
    ]
