"""``fed-llama export``: adapter -> merged model -> ONNX -> verified -> kept.

Everything is built in a temporary folder beside ``--out`` and renamed into place only after
verification passed, so a failure or an interruption never leaves a half-written export and
never touches an existing one. The folder holds the ONNX model (``model.onnx`` +
``model.onnx.data``), the tokenizer and chat template, onnxruntime-genai's
``genai_config.json``, ``export_manifest.json`` (source adapter and its hashes, backbone,
what the adapter was merged into, quantization, sizes, verification figures, the runtime it
needs) and a device ``README.md`` written from it (:mod:`fed_llama.export.folder`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fed_llama import __version__
from fed_llama.adapter.store import check_output_dir, read_manifest
from fed_llama.common.files import file_sha256, replace_dir
from fed_llama.config.export import ExportConfig
from fed_llama.data import icd10
from fed_llama.data.records import Example
from fed_llama.data.tokenize import encode_all
from fed_llama.errors import ConfigError
from fed_llama.export.branches import from_model
from fed_llama.export.build import ExportError, build_onnx, check_export_dependencies
from fed_llama.export.embedding import share_tied_embedding
from fed_llama.export.folder import (
    MANIFEST,
    TOKENS_CHECKED,
    check_genai,
    runtime_requirements,
    write_folder_files,
)
from fed_llama.export.gptq import calibrate_graph
from fed_llama.export.graft import graft_branches
from fed_llama.export.merge import (
    MergedModel,
    check_foldable,
    fold_adapter,
    load_base,
    merge_adapter,
    save_merged,
)
from fed_llama.export.plain import export_plain, quantize_plain
from fed_llama.export.runtime import OnnxCausalLM
from fed_llama.export.switchable import make_overridable, write_onnx_adapter, write_projections
from fed_llama.export.verify import (
    ICD10,
    calibration_set,
    check_bounds,
    verification_sources,
    verify_export,
)

log = logging.getLogger(__name__)

EXPORT_MANIFEST = MANIFEST


def check_sources(sources: list[str]) -> None:
    """Refuse unknown ICD-10 sites and missing files before any slow work."""
    problems = []
    for source in sources:
        if source.startswith(ICD10):
            if source[len(ICD10):] not in icd10.SITES:
                problems.append(f"verify.data {source!r}: unknown ICD-10 site (sites: "
                                f"{', '.join(sorted(icd10.SITES))})")
        elif not Path(source).is_file():
            problems.append(f"verify.data {source!r}: no such JSONL file")
    if problems:
        raise ConfigError("; ".join(problems))


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def export_adapter(adapter: Path | None, out: Path, cfg: ExportConfig, *,
                   backbone: str | None = None, force: bool = False) -> dict[str, Any]:
    """Merge, build, verify and write the export; return its manifest.

    Raises :class:`ExportError` (nothing written) when verification fails its bounds.
    """
    check_output_dir(out, force)
    check_export_dependencies()
    manifest_in = read_manifest(adapter) if adapter else {}
    settings = (check_foldable(adapter, runtime_adapters=cfg.runtime_adapters)
                if adapter is not None else None)
    sources = verification_sources(cfg.verify, manifest_in)
    check_sources(sources)
    system = manifest_in.get("system_prompt")  # read_manifest checked it is text or None
    # refuses a source without any, before the work
    calibration = calibration_set(sources, cfg, system)
    switchable = cfg.runtime_adapters and adapter is not None
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        onnx_dir = work / "onnx"
        runtime: dict[str, Any] = {}
        # LoRA switches as the builder's own LoRA branches; V1 and Excitor as their grafted
        # branch constants (check_foldable refuses the rest)
        lora_branches = switchable and settings is not None and settings.method == "lora"
        if lora_branches and adapter is not None:
            base = load_base(adapter, backbone)
            hf_dir = save_merged(base, work / "base")
            merged = fold_adapter(base, adapter, settings)  # the PyTorch reference
        else:
            merged = merge_adapter(adapter, backbone, settings)
            hf_dir = save_merged(merged, work / "merged")
        quantization = build_graph(merged, hf_dir, onnx_dir, cfg, calibration, work / "cache",
                                   adapter=adapter if lora_branches else None)
        if switchable and adapter is not None:
            slots = make_overridable(onnx_dir / "model.onnx")
            if merged.branches:  # a V1 site's prompts go through these k/v projections
                write_projections(merged.model, onnx_dir)
            name = adapter.resolve().name
            write_onnx_adapter(adapter, onnx_dir, name)
            runtime = {"slots": len(slots), "built_in": name, "adapters": [name]}
        lm = OnnxCausalLM(onnx_dir)
        report = verify_export(merged.model, merged.tokenizer, lm, cfg, sources, system)
        failures = check_bounds(report, cfg)
        if failures:
            raise ExportError(f"export refused, nothing written to {out}: "
                              + "; ".join(failures))
        runtime_needs = runtime_requirements(onnx_dir / "model.onnx")
        prompt = lm.encode_chat([{"role": "user", "content": "hello"}])
        runtime_needs["onnxruntime-genai"] = check_genai(
            onnx_dir, prompt, list(lm.generate_ids(prompt, max_new_tokens=TOKENS_CHECKED)))
        manifest = {
            "format_version": 1,
            "fed_llama_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "profile": dataclasses.asdict(cfg),
            "quant": cfg.quant,
            "source_adapter": _adapter_identity(adapter, manifest_in),
            "system_prompt": system,
            "method": settings.method if settings is not None else None,
            # what of the adapter is a branch in the graph rather than folded into weights
            "adapter_branches": merged.branches,
            "backbone": merged.backbone.describe(),
            "merged_into": merged.merged_into,
            "quantization": quantization,
            "runtime_adapters": runtime,
            "runtime": runtime_needs,
            "size_mb": {"model": round(sum(p.stat().st_size for p in
                                           onnx_dir.glob("model.onnx*")) / 1e6, 2),
                        "folder": round(folder_size_mb(onnx_dir), 2),
                        "pytorch_fp32": round(sum(p.numel() * 4 for p in
                                                  merged.model.parameters()) / 1e6, 2)},
            "verification": report,
            "export_seconds": round(time.monotonic() - started, 1),
        }
        write_folder_files(onnx_dir, manifest)
        replace_dir(onnx_dir, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def build_graph(merged: MergedModel, hf_dir: Path, onnx_dir: Path, cfg: ExportConfig,
                calibration: list[Example], cache: Path,
                adapter: Path | None = None) -> dict[str, Any]:
    """Build the ONNX graph of ``hf_dir`` (the folder of ``merged``) into ``onnx_dir``; with
    ``algorithm = 'gptq'`` calibrate its 4-bit projections on ``calibration`` (from
    :func:`calibration_set`); int8 builds read the tied embedding from the LM head's 8-bit
    weights (:mod:`fed_llama.export.embedding`). Returns what the manifest records of the
    quantization (the GPTQ report, or the quantizer used)."""
    gptq = cfg.algorithm == "gptq"
    if cfg.exporter == "torch":
        export_plain(merged.model, hf_dir, onnx_dir)
        if cfg.quant == "fp32":
            return {"algorithm": None, "exporter": "torch.onnx.export"}
        # GPTQ writes MatMulNBits' asymmetric grid (a zero point per block)
        found = quantize_plain(onnx_dir / "model.onnx", 8 if cfg.quant == "int8" else 4,
                               cfg.block_size, cfg.accuracy_level, symmetric=not gptq,
                               head_bits=8 if "last_matmul" in cfg.mixed_precision else None)
        if found["lm_head_bits"] == 8:  # the lookup reads the 8-bit LM head's blocks
            found.update(share_tied_embedding(onnx_dir / "model.onnx"))
        if not gptq:
            return found
    else:
        build_onnx(hf_dir, onnx_dir, cfg, cache=cache, adapter=adapter)
        # the branches that do not fold (prompts, the Excitor's keys), wired around the
        # builder's attention as constants; the builder itself reads the projections only
        found = (graft_branches(onnx_dir / "model.onnx", from_model(merged.model))
                 if merged.branches else {})
        if cfg.quant == "int8":
            return {"algorithm": cfg.algorithm, **found,
                    **share_tied_embedding(onnx_dir / "model.onnx")}
        if not gptq:
            return {"algorithm": cfg.algorithm if cfg.quant != "fp32" else None, **found}
    items, _ = encode_all(merged.tokenizer, calibration, cfg.verify.max_length)
    report = calibrate_graph(merged.model, [item.input_ids for item in items],
                             onnx_dir / "model.onnx", block_size=cfg.block_size)
    if cfg.exporter == "torch":  # its quantizer's count of 4-bit MatMuls, and GPTQ's
        report["calibrated"] = report.pop("matrices")
    return {**found, **report}


def _adapter_identity(adapter: Path | None, manifest: dict[str, Any]) -> dict[str, Any]:
    if adapter is None:
        return {}
    return {"path": str(adapter.resolve()),
            "files": {name: file_sha256(adapter / name)
                      for name in ("adapter_config.json", "adapter_model.safetensors")},
            "kind": manifest.get("kind", "site-adapter"), "round": manifest.get("round"),
            "sites": manifest.get("sites"), "method": manifest.get("method")}
