"""The plain route: ``torch.onnx.export`` of the merged model, fp32, with a KV cache.

onnxruntime-genai's builder (:mod:`fed_llama.export.build`) is the default route: its fused
attention decodes faster and it quantizes. This route traces the PyTorch model itself (the
TorchScript exporter), so it needs nothing but torch and onnx and follows whatever the model's
own code does: it is kept for a LLaMA-family variant the builder cannot build, as an
independent cross-check of the builder's graph, and as the baseline ``benchmarks/edge.py``
compares the builder against. It is also the route of the adapter methods that do not fold
into the backbone (V1 and V2 prompts, the Excitor's key branch): the tracer follows their
branches like any other code, the prompt branch before ``o_proj`` and the Excitor's keys,
whose modified values are what goes into the cache. int8/int4: onnxruntime's
``MatMulNBitsQuantizer`` (round-to-nearest blocks) on the traced graph's projections and LM
head, the adapter's own small matrices left in fp32 (:func:`quantize_plain`).

The graph has the builder's interface (``input_ids``, ``attention_mask``,
``past_key_values.N.key/value`` in; ``logits``, ``present.N.key/value`` out; positions follow
from the cache length), and the folder gets the same ``genai_config.json`` and tokenizer
files, so :class:`~fed_llama.export.runtime.OnnxCausalLM` and ``fed-llama generate`` run it
unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from fed_llama.common.files import umask_mode, write_text_atomic
from fed_llama.export.build import ExportError
from fed_llama.export.runtime import io_names

log = logging.getLogger(__name__)

OPSET = 17
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def export_plain(model: Any, hf_dir: Path, out: Path) -> Path:
    """Write ``out/model.onnx`` (fp32, KV cache) of the merged ``model``, whose Hugging Face
    folder (config and tokenizer) is ``hf_dir``; return the model file."""
    import torch

    config = model.config
    layers = int(config.num_hidden_layers)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_size = int(getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
    inputs, outputs = io_names(layers)
    dynamic = {"input_ids": {1: "sequence"}, "attention_mask": {1: "total_sequence"},
               "logits": {1: "sequence"}}
    dynamic.update({name: {2: "past_sequence"} for name in inputs[2:]})
    dynamic.update({name: {2: "total_sequence"} for name in outputs[1:]})
    # example sizes above 1 on every dynamic axis, so that the trace keeps them symbolic
    ids = torch.randint(0, int(config.vocab_size), (1, 3))
    past = [torch.zeros(1, kv_heads, 4, head_size) for _ in range(2 * layers)]
    mask = torch.ones(1, 7, dtype=torch.long)
    out.mkdir(parents=True, exist_ok=True)
    onnx_file = out / "model.onnx"
    log.info("exporting the fp32 ONNX graph with torch.onnx.export (%d layers)", layers)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python control flow
            torch.onnx.export(_flat_cache_decoder(model.eval(), layers), (ids, mask, *past),
                              str(onnx_file), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    except Exception as exc:  # the exporter raises many types for unsupported code
        raise ExportError(f"torch.onnx.export failed on {hf_dir} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): use "
                          "exporter = 'builder'") from None
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    write_text_atomic(out / "genai_config.json",
                      json.dumps(genai_config(config, head_size, kv_heads), indent=2),
                      umask_mode())
    return onnx_file


#: Nodes of an adapter's branch, kept fp32 when the graph is quantized (small, and what the
#: adapter learned): the Excitor's block; the prompt branches' MatMuls read no initializer.
BRANCH_NODES = ("/key_branch/",)


def quantize_plain(onnx_file: Path, bits: int, block_size: int, accuracy_level: int,
                   symmetric: bool = True, head_bits: int | None = None) -> dict[str, Any]:
    """Quantize the plain graph's projection and LM head MatMuls in place to ``bits``-bit
    blocks of ``block_size`` (onnxruntime's ``MatMulNBitsQuantizer``, round-to-nearest;
    ``symmetric`` False keeps a zero point per block, the grid GPTQ then rewrites);
    ``head_bits`` quantizes the LM head to that many bits instead (8 with 4-bit projections:
    ``mixed_precision = ["last_matmul"]``). What the manifest records of it."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from fed_llama.common.notices import ORT_QUANTIZER_LOGGER, below_info
    from fed_llama.export.build import save_graph

    model = onnx.load(str(onnx_file))
    keep = [n.name for n in model.graph.node if n.op_type == "MatMul"
            and any(part in n.name for part in BRANCH_NODES)]
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]
    log.info("quantizing the plain graph's MatMuls to %d-bit blocks of %d (%d branch nodes "
             "kept fp32%s)", bits, block_size, len(keep),
             f", the LM head {head_bits}-bit" if head_bits and head else "")
    # (bits, nodes left alone, nodes only): the projections, then the head at its own bits
    passes = ([(bits, keep + head, None), (head_bits, keep, head)] if head_bits and head
              else [(bits, keep, None)])
    for width, exclude, include in passes:
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                              accuracy_level=accuracy_level, bits=width)
        quantizer = MatMulNBitsQuantizer(model, bits=width, block_size=block_size,
                                         is_symmetric=symmetric, accuracy_level=accuracy_level,
                                         nodes_to_exclude=exclude, nodes_to_include=include,
                                         algo_config=config)
        with below_info(ORT_QUANTIZER_LOGGER):
            quantizer.process()
        model = quantizer.model.model
    count = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    if not count:
        raise ExportError(f"onnxruntime's MatMulNBitsQuantizer quantized no MatMul of "
                          f"{onnx_file}: use quant = 'fp32' with exporter = 'torch'")
    shared = share_quantized_weights(model)
    save_graph(model, onnx_file)
    return {"algorithm": "default", "exporter": "torch.onnx.export",
            "quantizer": "onnxruntime MatMulNBitsQuantizer", "bits": bits,
            "symmetric": symmetric, "lm_head_bits": head_bits if head_bits and head else bits,
            "block_size": block_size, "matrices": count, "shared-weight-matmuls": shared,
            "fp32-branch-matmuls": len(keep), "embedding": "fp32"}


def share_quantized_weights(model: Any) -> int:
    """Point every MatMul that reads a quantized weight through an ``Identity`` at that
    weight's quantized blocks; return how many were rewired.

    The tracer writes a weight's second use (the prompt branch's ``k_proj``/``v_proj`` on the
    prompts, V1's ``o_proj`` on the branch's output) as ``Identity(weight)``, and onnxruntime's
    quantizer only quantizes a MatMul whose weight is an initializer, so the file would keep an
    fp32 copy of each such weight beside its quantized blocks. The rewired MatMul becomes a
    ``MatMulNBits`` on the same blocks, scales and zero points as the token path's (the same
    weight, the same rounding: what GPTQ then writes into those blocks reaches both uses), and
    the fp32 weight is dropped once nothing reads it.
    """
    import onnx

    graph = model.graph
    # the token path's quantized node of each weight, by the weight's name
    quantized = {n.input[1].rsplit("_Q", 1)[0]: n for n in graph.node
                 if n.op_type == "MatMulNBits" and "_Q" in n.input[1]}
    through = {n.output[0]: n.input[0] for n in graph.node
               if n.op_type == "Identity" and n.input[0] in quantized}
    nodes, rewired = [], 0
    for node in graph.node:  # in order: each new node takes its MatMul's place
        if node.op_type == "MatMul" and node.input[1] in through:
            twin = quantized[through[node.input[1]]]
            shared = onnx.helper.make_node(
                "MatMulNBits", [node.input[0], *twin.input[1:]], list(node.output),
                name=node.name + "_shared", domain=twin.domain)
            shared.attribute.extend(twin.attribute)
            nodes.append(shared)
            rewired += 1
        else:
            nodes.append(node)
    read = {name for n in nodes for name in n.input}
    nodes = [n for n in nodes if not (n.op_type == "Identity" and n.output[0] in through
                                      and n.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for n in nodes for name in n.input} | {o.name for o in graph.output}
    for init in [t for t in graph.initializer if t.name in quantized and t.name not in read]:
        graph.initializer.remove(init)
    return rewired


def genai_config(config: Any, head_size: int, kv_heads: int) -> dict[str, Any]:
    """The decoder description (onnxruntime-genai's ``genai_config.json`` layout)."""
    eos = config.eos_token_id
    return {"model": {
        "bos_token_id": config.bos_token_id,
        "context_length": int(config.max_position_embeddings),
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": "model.onnx", "head_size": head_size,
            "hidden_size": int(config.hidden_size),
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "past_key_names": "past_key_values.%d.key",
                       "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": int(config.num_attention_heads),
            "num_hidden_layers": int(config.num_hidden_layers),
            "num_key_value_heads": kv_heads},
        "eos_token_id": eos, "pad_token_id": config.pad_token_id if config.pad_token_id
        is not None else (eos[0] if isinstance(eos, list) else eos),
        "type": "llama", "vocab_size": int(config.vocab_size)},
        # the cache grows by concatenation here, not in a preallocated buffer
        "search": {"do_sample": False, "max_length": int(config.max_position_embeddings),
                   "num_beams": 1, "past_present_share_buffer": False}}


def _flat_cache_decoder(model: Any, layers: int) -> Any:
    """``model`` as a module taking and returning the cache as flat tensors (what an ONNX
    graph can carry); torch is imported here, not when this module is."""
    import torch
    from transformers import DynamicCache

    from fed_llama.backbone.kv_cache import cache_argument, returned_cache

    argument = cache_argument(model)

    class FlatCacheDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, *past: Any) -> tuple[Any, ...]:
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            start = past[0].shape[2]
            positions = (torch.arange(input_ids.shape[1]) + start).unsqueeze(0)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=positions, use_cache=True,
                             **{argument: cache})
            grown = returned_cache(out)
            flat = [t for i in range(layers)
                    for t in (grown.layers[i].keys, grown.layers[i].values)]
            return (out.logits, *flat)

    return FlatCacheDecoder()
