"""Build an ONNX decoder with a KV cache from a Hugging Face LLaMA folder.

The graph is made by onnxruntime-genai's model builder: fused GroupQueryAttention with rotary
embeddings and RMSNorm, ``past_key_values.N.key/value`` inputs and ``present.N.key/value``
outputs, and block-wise int8/int4 (MatMulNBits) weights with the tied embedding / LM head
quantized too. Measured here (``../shared/notes/edge-export.md``) it decodes faster than a
plain ``torch.onnx.export`` graph at every precision and its block-wise int8 costs under 1%
perplexity where onnxruntime's ``quantize_dynamic`` costs 73%, so it is the default route; the
plain ``torch.onnx.export`` route (fp32, :mod:`fed_llama.export.plain`) is kept beside it.

The builder runs in a child process: it prints freely and holds the whole model in memory,
and neither should leak into the caller.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fed_llama.common.files import umask_mode
from fed_llama.config.export import ExportConfig
from fed_llama.errors import FedLlamaError

log = logging.getLogger(__name__)

BUILDER = "onnxruntime_genai.models.builder"
NEEDED = {"onnxruntime_genai": "onnxruntime-genai", "onnx_ir": "onnx-ir", "onnx": "onnx",
          "onnxruntime": "onnxruntime"}


class ExportError(FedLlamaError):
    """An export could not be built or failed its verification."""


#: What ``fed-llama export`` imports besides the export extra (fed-llama's own dependencies).
NEEDED_TO_MERGE = {"torch": "torch", "transformers": "transformers", "peft": "peft",
                   "safetensors": "safetensors", "numpy": "numpy"}
#: What the torch-free edge paths import: ``generate --onnx`` and ``export-adapter``.
EDGE_RUNTIME = {"numpy": "numpy", "onnxruntime": "onnxruntime", "tokenizers": "tokenizers",
                "jinja2": "jinja2"}
ADAPTER_FILES = {"numpy": "numpy", "safetensors": "safetensors", "onnxruntime": "onnxruntime"}


def missing_packages(modules: dict[str, str]) -> list[str]:
    """The pip names of ``modules`` (import name -> pip name) that cannot be imported here."""
    missing = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a blocked or half-removed package
            found = False
        if not found:
            missing.append(package)
    return missing


def require(modules: dict[str, str], command: str) -> None:
    """Refuse in one line, naming the missing packages and how to install them, before a
    command imports them (and would fail with a traceback)."""
    missing = missing_packages(modules)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ExportError(f"{command} needs {', '.join(missing)}, which {verb} not installed "
                          f"here: pip install {' '.join(missing)}")


def check_export_dependencies() -> None:
    """Refuse early, naming the packages to install, when the export extra is missing."""
    missing = missing_packages({**NEEDED_TO_MERGE, **NEEDED})
    if missing:
        raise ExportError(f"edge export needs {', '.join(missing)}: "
                          "pip install 'fed-llama[export]'")


def builder_options(cfg: ExportConfig, adapter: Path | None = None) -> list[str]:
    """The builder's ``--extra_options`` for ``cfg`` (``KEY=VALUE`` strings).

    With ``adapter`` the graph gets LoRA branches holding it (runtime adapters); they stay
    fp32 so that other adapters can replace them.
    """
    options = ["hf_token=false", "hf_remote=false"]
    lora_nodes: list[str] = []
    if adapter is not None:
        from fed_llama.export.switchable import lora_node_names

        options.append(f"adapter_path={adapter}")
        lora_nodes = lora_node_names(adapter)
    if not any(f"/mlp/{proj}/" in node for node in lora_nodes for proj in ("gate_proj", "up_proj")):
        # one MatMul(NBits) + Split for gate and up: the same numbers, 30 fewer kernel launches
        # per token (~6% faster int8 decoding here); the builder cannot fuse adapted projections
        options.append("fuse_mlp_gate_up=true")
    if cfg.quant != "fp32":
        # gptq: the builder's k_quant graph, whose decoder projections gptq.py then replaces
        algo = "k_quant" if cfg.algorithm == "gptq" else cfg.algorithm
        options += [f"block_size={cfg.block_size}", f"accuracy_level={cfg.accuracy_level}",
                    f"algo_config={algo}"]
        if cfg.mixed_precision:
            mix = ",".join(f"{group}:int8" for group in cfg.mixed_precision)
            options.append(f"matmul_mixed_precision={mix}")
        if lora_nodes:
            options.append(f"nodes_to_exclude={','.join(lora_nodes)}")
    return options


def save_graph(model: Any, onnx_file: Path) -> None:
    """Write ``model`` (an ``onnx.ModelProto`` with its weights loaded) over ``onnx_file``, the
    weights in ``<onnx_file>.data`` as the builder writes them.

    Both files are written into a temporary folder beside it and renamed into place (weights
    first, as the graph names them), with the mode the umask gives (onnx writes external
    data 0600, which would keep the weights from another user on the device)."""
    import onnx

    data = onnx_file.name + ".data"
    tmp = Path(tempfile.mkdtemp(dir=onnx_file.parent, prefix=f".{onnx_file.name}.",
                                suffix=".tmp"))
    try:
        onnx.save_model(model, str(tmp / onnx_file.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data)
        mode = umask_mode()
        for name in (data, onnx_file.name):
            os.chmod(tmp / name, mode)
            os.replace(tmp / name, onnx_file.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_onnx(hf_dir: Path, out: Path, cfg: ExportConfig, cache: Path,
               adapter: Path | None = None) -> Path:
    """Build ``out/model.onnx`` (+ ``model.onnx.data``, genai config, tokenizer) from ``hf_dir``.

    ``adapter``: build LoRA branches holding it (see :mod:`fed_llama.export.switchable`).
    ``out`` must be a fresh folder; on failure the builder's last lines are in the error.
    """
    check_export_dependencies()
    cmd = [sys.executable, "-m", BUILDER, "-i", str(hf_dir), "-o", str(out),
           "-p", cfg.quant, "-e", "cpu", "-c", str(cache),
           "--extra_options", *builder_options(cfg, adapter)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    log.info("building the %s ONNX graph (onnxruntime-genai builder, in a child process%s)",
             cfg.quant, "; int4 takes minutes on a small CPU" if cfg.quant == "int4" else "")
    log.debug("builder: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    onnx_file = out / "model.onnx"
    if proc.returncode != 0 or not onnx_file.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        raise ExportError(f"the ONNX builder failed (exit {proc.returncode}) on {hf_dir}:\n"
                          f"{tail}")
    return onnx_file
