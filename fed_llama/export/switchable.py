"""Runtime-switchable adapters: export the base once, each site's adapter as a small file.

The graph is built with the adapter's branches whose tensors are *overridable* initializers:
they are also graph inputs, so an onnxruntime ``LoraAdapter`` can replace them per run
(``RunOptions.add_active_adapter``). The built-in values are the export's own adapter;
``adapters/<name>.onnx_adapter`` files hold the others. Swapping an adapter needs no re-export
and no torch: this module reads the adapter's safetensors with numpy.

- **LoRA**: branches ``x·A`` then ``·(scale·B)`` added to each adapted projection; slots named
  as onnxruntime-genai's builder names them,
  ``model.layers.<i>.{attn,mlp}.<proj>.lora_{A,B}.MatMul.weight``, A stored as ``A^T``
  [in, r] and B as ``(scale·B)^T`` [r, out].
- **LLaMA-Adapter V1, Excitor**: the grafted branch constants
  (:mod:`fed_llama.export.branches`, ``model.layers.<i>.attn.graft.<what>``). A V1 site's
  prompt keys and values go through the backbone's ``k_proj``/``v_proj``, whose weights for
  the adapted layers the export keeps in ``adapters/prompt_projections.safetensors``. V2
  cannot switch: its biases and scales are folded into the projection weights themselves.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fed_llama.common.files import umask_mode, write_bytes_atomic, write_text_atomic
from fed_llama.errors import AdapterError
from fed_llama.export.branches import SLOT_MARK

ADAPTERS_DIR = "adapters"
SLOTS_FILE = "slots.json"
SUFFIX = ".onnx_adapter"
_PEFT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


def slot_name(peft_key: str) -> str | None:
    """The graph's slot for a peft tensor name, or None if it is not a LoRA factor we know."""
    m = _PEFT_KEY.match(peft_key)
    if not m:
        return None
    layer, block, proj, ab = m.groups()
    return f"model.layers.{layer}.{'attn' if block == 'self_attn' else 'mlp'}.{proj}." \
           f"lora_{ab}.MatMul.weight"


def lora_node_names(adapter: Path) -> list[str]:
    """The builder's node names of the LoRA MatMuls (kept out of weight quantization)."""
    names = []
    for key in _peft_tensor_names(adapter):
        m = _PEFT_KEY.match(key)
        if m:
            layer, block, proj, ab = m.groups()
            names.append(f"/model/layers.{layer}/{'attn' if block == 'self_attn' else 'mlp'}"
                         f"/{proj}/lora_{ab}/MatMul")
    return names


def make_overridable(onnx_file: Path) -> dict[str, list[int]]:
    """List the graph's LoRA initializers among its inputs; return slot -> shape.

    Only ``model.onnx`` is rewritten; the weights in ``model.onnx.data`` are not touched.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_file), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    slots = {}
    for init in model.graph.initializer:
        if (".lora_" in init.name and init.name.endswith(".MatMul.weight")) or (
                SLOT_MARK in init.name):
            slots[init.name] = list(init.dims)
            if init.name not in inputs:
                model.graph.input.append(helper.make_tensor_value_info(
                    init.name, init.data_type, list(init.dims)))
    if not slots:
        raise AdapterError(f"{onnx_file} has no adapter branches to switch: it was built "
                           "without runtime_adapters")
    write_bytes_atomic(onnx_file, model.SerializeToString(), umask_mode())
    write_text_atomic(onnx_file.parent / ADAPTERS_DIR / SLOTS_FILE, json.dumps(slots, indent=1),
                      umask_mode())
    return slots


def write_projections(model: Any, export_dir: Path) -> Path | None:
    """Keep the ``k_proj``/``v_proj`` weights of ``model``'s prompt layers in the export's
    ``adapters/`` folder, for another V1 site's prompt keys and values (None: no prompts)."""
    from safetensors.numpy import save

    from fed_llama.export.branches import PROJECTIONS, projection_arrays

    arrays = projection_arrays(model)
    if not arrays:
        return None
    out = export_dir / ADAPTERS_DIR / PROJECTIONS
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, save(arrays), umask_mode())
    return out


def read_slots(export_dir: Path) -> dict[str, list[int]]:
    path = export_dir / ADAPTERS_DIR / SLOTS_FILE
    if not path.is_file():
        raise AdapterError(f"{str(export_dir)!r} was exported without runtime adapters (no "
                           f"{ADAPTERS_DIR}/{SLOTS_FILE}): export it with --set "
                           "runtime_adapters=true")
    slots: dict[str, list[int]] = json.loads(path.read_text())
    return slots


def adapter_arrays(adapter: Path, export_dir: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors laid out as the export's slots; refuses any mismatch."""
    slots = read_slots(export_dir)
    if any(SLOT_MARK in name for name in slots):
        return _fitted(adapter, slots, _branch_arrays(adapter, export_dir, slots))
    return _fitted(adapter, slots, _lora_arrays(adapter))


def _branch_arrays(adapter: Path, export_dir: Path, slots: dict[str, list[int]]
                   ) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from fed_llama.export.branches import PROJECTIONS, from_adapter, slot_arrays

    prompt_keys = [shape for name, shape in slots.items() if name.endswith(".prompt_keys")]
    projections: dict[str, np.ndarray] = {}
    heads = head_dim = 0
    if prompt_keys:  # (heads, head_dim, L)
        heads, head_dim = prompt_keys[0][0], prompt_keys[0][1]
        path = export_dir / ADAPTERS_DIR / PROJECTIONS
        try:
            projections = load_file(str(path))
        except Exception as exc:  # a missing file or safetensors' own errors
            raise AdapterError(f"{str(export_dir)!r}: {ADAPTERS_DIR}/{PROJECTIONS} cannot be "
                               f"read ({exc}): copy the export folder again") from None
    return slot_arrays(from_adapter(adapter, projections, heads, head_dim), slots)


def _lora_arrays(adapter: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    config = _adapter_config(adapter)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    try:
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"adapter {str(adapter)!r}: adapter_model.safetensors cannot be read "
                           f"({exc})") from None
    arrays: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = slot_name(key)
        if name is None:
            raise AdapterError(f"adapter {str(adapter)!r}: tensor {key!r} is not a LoRA factor "
                               "of an attention or MLP projection; it cannot be switched in")
        value = value.astype(np.float32)
        arrays[name] = np.ascontiguousarray(value.T if ".lora_A." in name else (scale * value).T)
    return arrays


def _fitted(adapter: Path, slots: dict[str, list[int]], arrays: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
    """``arrays``, refused in one line unless they fill exactly ``slots`` with their shapes."""
    missing = sorted(set(slots) - set(arrays))
    extra = sorted(set(arrays) - set(slots))
    wrong = sorted(n for n in set(arrays) & set(slots) if list(arrays[n].shape) != slots[n])
    if missing or extra or wrong:
        detail = "; ".join(x for x in (
            f"{len(missing)} slot(s) it does not fill, e.g. {missing[0]}" if missing else "",
            f"{len(extra)} tensor(s) with no slot, e.g. {extra[0]}" if extra else "",
            f"shape {list(arrays[wrong[0]].shape)} for {wrong[0]}, the export has "
            f"{slots[wrong[0]]}" if wrong else "") if x)
        raise AdapterError(f"adapter {str(adapter)!r} does not fit this export ({detail}): "
                           "runtime adapters must have the method, rank, layers and target "
                           "modules of the adapter the export was built with")
    return arrays


def write_onnx_adapter(adapter: Path, export_dir: Path, name: str) -> Path:
    """Write ``export_dir/adapters/<name>.onnx_adapter`` from a peft adapter folder."""
    import onnxruntime as ort

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise AdapterError(f"--name {name!r}: use letters, digits, '.', '_' or '-'")
    arrays = adapter_arrays(adapter, export_dir)
    # ortvalue_from_numpy does not copy: ``arrays`` must stay alive until the file is written
    params = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    out = export_dir / ADAPTERS_DIR / f"{name}{SUFFIX}"
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fmt.export_adapter(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    del arrays
    return out


def _adapter_config(adapter: Path) -> dict[str, Any]:
    path = adapter / "adapter_config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
        int(config["r"]), float(config["lora_alpha"])
    except FileNotFoundError:
        raise AdapterError(f"adapter {str(adapter)!r} has no adapter_config.json: give a peft "
                           "adapter folder") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"adapter {str(adapter)!r}: adapter_config.json is not a LoRA "
                           f"config ({exc!r})") from None
    return config


def _peft_tensor_names(adapter: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="numpy") as fh:
        return list(fh.keys())


def add_adapter(adapter: Path, export_dir: Path, name: str | None = None) -> Path:
    """``fed-llama export-adapter``: check ``adapter`` against the export, write its file and
    record it (with its sha256) in the export's manifest."""
    from fed_llama.adapter.store import read_manifest
    from fed_llama.common.files import file_sha256
    from fed_llama.export.folder import README, write_readme

    manifest_path = export_dir / "export_manifest.json"
    if not manifest_path.is_file():
        raise AdapterError(f"--onnx {str(export_dir)!r} is not a folder written by "
                           "`fed-llama export` (no export_manifest.json)")
    export = json.loads(manifest_path.read_text())
    adapter_manifest = read_manifest(adapter)
    method, exported_method = (adapter_manifest.get("method") or "lora",
                               export.get("method") or "lora")
    if method != exported_method:
        raise AdapterError(f"adapter {str(adapter)!r} is a {method} adapter; this export "
                           f"switches {exported_method} adapters: give one of those, or export "
                           "this one with runtime_adapters")
    trained_on = adapter_manifest.get("backbone", {}).get("sha256")
    exported = export.get("backbone", {}).get("sha256")
    if trained_on and exported and trained_on != exported:
        raise AdapterError(f"adapter {str(adapter)!r} was trained on another backbone "
                           f"(sha256 {trained_on[:12]}...) than this export's "
                           f"({exported[:12]}...): export that backbone instead")
    trained, asked = adapter_manifest.get("system_prompt"), export.get("system_prompt")
    if trained != asked:  # the runtime asks every adapter with the export's system message
        def said(text: object) -> str:
            return "the chat template's default" if text is None else json.dumps(text)
        raise AdapterError(f"adapter {str(adapter)!r} was trained with the system message "
                           f"{said(trained)}; this export asks with {said(asked)}: export "
                           "this adapter on its own, or train it with the same data."
                           "system_prompt")
    name = name or adapter.resolve().name
    out = write_onnx_adapter(adapter, export_dir, name)
    runtime = export.setdefault("runtime_adapters", {})
    runtime["adapters"] = sorted(set(runtime.get("adapters", [])) | {name})
    files = export.setdefault("files", {})
    files[f"{ADAPTERS_DIR}/{out.name}"] = file_sha256(out)
    write_readme(export_dir, export)  # it lists the new adapter
    files[README] = file_sha256(export_dir / README)
    write_text_atomic(manifest_path, json.dumps(export, indent=2, default=str), umask_mode())
    return out
