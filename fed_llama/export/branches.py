"""The constants of the adapter branches that do not fold, as the builder's graph holds them.

An adapted layer's prompt branch (LLaMA-Adapter V1, V2) or Excitor block is, once trained, a
function of constants: the prompt keys and values (through the layer's frozen ``k_proj`` and
``v_proj``) and the gate, or the Excitor's affinity and key matrices. They are computed here
with numpy by one set of functions, from either source:

* the PyTorch model with the adapter attached (:func:`from_model`: ``fed-llama export``);
* an adapter folder plus the adapted layers' ``k_proj``/``v_proj`` weights
  (:func:`from_adapter`: ``fed-llama export-adapter``, without torch), for runtime-switchable
  exports, whose graph lists these constants among its inputs (:data:`SLOT` names them) so
  that an ``.onnx_adapter`` file of another site's constants replaces them per run.

:mod:`fed_llama.export.graft` wires them into the graph.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fed_llama.errors import AdapterError

SLOT = "model.layers.{}.attn.graft.{}"
"""A branch constant's name in the graph (and its runtime slot): layer, then ``prompt_keys``,
``prompt_values``, ``affinity`` or ``keys``."""
SLOT_MARK = ".attn.graft."
PROJECTIONS = "prompt_projections.safetensors"
"""A switchable prompt export's ``adapters/`` file: the adapted layers' ``k_proj``/``v_proj``
weights (fp32), from which another site's prompt keys and values are computed."""
_TENSOR = re.compile(r"layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate|"
                     r"key_branch\.(?:prompt|a_q|a_k|down|up|gate))$")


@dataclass(frozen=True)
class PromptBranch:
    """A layer's adaption prompts as the graph needs them."""

    layer: int
    keys: np.ndarray
    """(heads, head_dim, L): the prompt keys per query head, transposed, times 1/√d."""
    values: np.ndarray
    """(heads, L, head_dim): the prompt values per query head, times the head's gate."""


@dataclass(frozen=True)
class KeyBranch:
    """A layer's Excitor block as the graph needs it."""

    layer: int
    affinity: np.ndarray
    """(hidden, L): ``A_q·(P·A_k)ᵀ/√r``; the token's scores are ``x·affinity``."""
    keys: np.ndarray
    """(L, kv_heads·head_dim): ``P·W_down·W_up``, times ``tanh(g)`` per KV head."""


Branch = PromptBranch | KeyBranch


def prompt_branch(layer: int, prompt: np.ndarray, k_proj: tuple[np.ndarray, np.ndarray | None],
                  v_proj: tuple[np.ndarray, np.ndarray | None], gate: np.ndarray,
                  head_dim: int) -> PromptBranch:
    """``prompt`` (L, hidden) through ``k_proj``/``v_proj`` (weight (kv·d, hidden), bias or
    None), each KV head repeated for the query heads of its group; ``gate`` (heads,) is the
    factor per head (``tanh(g)`` for fed-llama's, peft's V1 scalar ``g`` repeated)."""
    length, heads = len(prompt), len(gate)

    def project(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        out = prompt.astype(np.float32) @ weight.astype(np.float32).T
        out = out + bias if bias is not None else out
        kv = out.reshape(length, -1, head_dim)                      # (L, kv, d)
        return np.repeat(kv, heads // kv.shape[1], axis=1)          # (L, heads, d)

    keys = project(*k_proj).transpose(1, 2, 0) / math.sqrt(head_dim)
    values = project(*v_proj).transpose(1, 0, 2) * gate.reshape(-1, 1, 1)
    return PromptBranch(layer, np.ascontiguousarray(keys, np.float32),
                        np.ascontiguousarray(values, np.float32))


def key_branch(layer: int, prompt: np.ndarray, a_q: np.ndarray, a_k: np.ndarray,
               down: np.ndarray, up: np.ndarray, gate: np.ndarray) -> KeyBranch:
    """The Excitor block of :class:`~fed_llama.adapter.methods.excitor.layers.ExcitorKeys`
    (``gate`` (kv, 1), zero at init) as its two constants."""
    f = [x.astype(np.float32) for x in (prompt, a_q, a_k, down, up, gate)]
    prompt, a_q, a_k, down, up, gate = f
    kv = gate.shape[0]
    affinity = a_q @ (prompt @ a_k).T / math.sqrt(a_q.shape[1])
    keys = ((prompt @ down) @ up).reshape(len(prompt), kv, -1) * np.tanh(gate)
    return KeyBranch(layer, np.ascontiguousarray(affinity, np.float32),
                     np.ascontiguousarray(keys.reshape(len(prompt), -1), np.float32))


def packed_keys(branch: KeyBranch, width: int) -> np.ndarray:
    """``branch.keys`` over ``width`` columns, zero elsewhere: the key columns of a packed QKV
    projection (``width`` = (heads + 2·kv)·d: after the query columns, before the values) or
    a key projection of its own (``width`` = kv·d)."""
    kvd = branch.keys.shape[1]
    offset = width - 2 * kvd if width > kvd else 0
    out = np.zeros((branch.keys.shape[0], width), np.float32)
    out[:, offset:offset + kvd] = branch.keys
    return out


def slot_arrays(branches: list[Branch], slots: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """The graph slots' values for ``branches``, laid out as ``slots`` (name -> shape)."""
    arrays: dict[str, np.ndarray] = {}
    for b in branches:
        if isinstance(b, PromptBranch):
            arrays[SLOT.format(b.layer, "prompt_keys")] = b.keys
            arrays[SLOT.format(b.layer, "prompt_values")] = b.values
        else:
            arrays[SLOT.format(b.layer, "affinity")] = b.affinity
            name = SLOT.format(b.layer, "keys")
            arrays[name] = packed_keys(b, slots[name][1]) if name in slots else b.keys
    return arrays


def _attention_layers(model: Any) -> Any:
    """(layer index, the module at ``layers.N.self_attn``, its LlamaAttention) of ``model``,
    in layer order (peft's LLaMA-Adapter V1 wraps the LlamaAttention as ``.model``)."""
    for name, module in model.named_modules():
        match = re.search(r"layers\.(\d+)\.self_attn$", name)
        if match is not None:
            yield int(match.group(1)), module, getattr(module, "model", module)


def _array(t: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


def _projection(linear: Any) -> tuple[np.ndarray, np.ndarray | None]:
    return _array(linear.weight), (_array(linear.bias) if linear.bias is not None else None)


def from_model(model: Any) -> list[Branch]:
    """The branches of ``model`` (merged, its adapter's branches attached: peft's LLaMA-Adapter
    V1 or fed-llama's ``AdaptedAttention``), in layer order."""
    import torch

    from fed_llama.adapter.methods.attention import AdaptedAttention

    found: list[Branch] = []
    heads = model.config.num_attention_heads
    with torch.no_grad():
        for layer, module, attn in _attention_layers(model):
            prompt = getattr(module, "adaption_prompt", None)
            gate = getattr(module, "adaption_gate", None)
            if prompt is not None and gate is not None:
                g = _array(torch.tanh(gate) if isinstance(module, AdaptedAttention) else gate)
                found.append(prompt_branch(
                    layer, _array(prompt)[0], _projection(attn.k_proj),
                    _projection(attn.v_proj), np.broadcast_to(g.reshape(-1), (heads,)),
                    attn.head_dim))
            block = getattr(module, "key_branch", None)
            if block is not None:
                found.append(key_branch(layer, *(_array(getattr(block, n)) for n in (
                    "prompt", "a_q", "a_k", "down", "up", "gate"))))
    return found


def projection_arrays(model: Any) -> dict[str, np.ndarray]:
    """The ``k_proj``/``v_proj`` weights (and biases) of ``model``'s layers with adaption
    prompts (what :func:`from_adapter` needs), by the backbone's parameter names."""
    out = {}
    for layer, module, attn in _attention_layers(model):
        if getattr(module, "adaption_prompt", None) is None:
            continue
        for proj in ("k_proj", "v_proj"):
            for kind, array in zip(("weight", "bias"), _projection(getattr(attn, proj)),
                                   strict=True):
                if array is not None:
                    out[f"model.layers.{layer}.self_attn.{proj}.{kind}"] = array
    return out


def from_adapter(adapter: Path, projections: dict[str, np.ndarray], heads: int,
                 head_dim: int) -> list[Branch]:
    """The branches of the V1 or Excitor adapter folder ``adapter`` (numpy and safetensors
    only), its prompts through ``projections`` (:func:`projection_arrays` of the export)."""
    from safetensors.numpy import load_file

    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
    except Exception as exc:  # a missing file, bad JSON, safetensors' own errors
        raise AdapterError(f"adapter {str(adapter)!r} cannot be read ({exc}): give an adapter "
                           "folder written by fed-llama") from None
    method = ("llama-adapter" if config.get("peft_type") == "ADAPTION_PROMPT"
              else config.get("fed_llama_method"))
    if method not in ("llama-adapter", "excitor"):
        raise AdapterError(f"adapter {str(adapter)!r} is a {method or 'LoRA'} adapter; this "
                           "export switches llama-adapter and excitor adapters")
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _TENSOR.search(key)
        if match is None:
            raise AdapterError(f"adapter {str(adapter)!r}: tensor {key!r} is not one of a "
                               f"{method} adapter's; it cannot be switched in")
        layers.setdefault(int(match.group(1)), {})[match.group(2).split(".")[-1]] = value
    found: list[Branch] = []
    for layer, t in sorted(layers.items()):
        if method == "excitor":
            found.append(key_branch(layer, *(t[n] for n in ("prompt", "a_q", "a_k", "down",
                                                            "up", "gate"))))
            continue
        name = f"model.layers.{layer}.self_attn.{{}}_proj.{{}}"
        k_weight, v_weight = (projections.get(name.format(p, "weight")) for p in "kv")
        if k_weight is None or v_weight is None:
            raise AdapterError(f"adapter {str(adapter)!r} adapts layer {layer}, which this "
                               "export's prompts do not: export-adapter needs an adapter with "
                               "the layers of the exported one")
        found.append(prompt_branch(
            layer, t["adaption_prompt"][0], (k_weight, projections.get(name.format("k", "bias"))),
            (v_weight, projections.get(name.format("v", "bias"))),
            np.broadcast_to(t["adaption_gate"].reshape(-1), (heads,)), head_dim))
    return found
