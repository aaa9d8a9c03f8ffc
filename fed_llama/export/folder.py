"""The export folder as a deliverable: what to ship, what runs it, and a README saying so.

A device engineer gets a folder, not this repository. :func:`runtime_requirements` reads from
the graph which onnxruntime it needs (the builder's fused attention and the int8 export's
8-bit ``GatherBlockQuantized`` are refused by onnxruntime 1.22, measured), :func:`check_genai`
loads the folder with plain onnxruntime-genai and generates a few tokens, and
:func:`device_readme` writes ``README.md`` from the manifest and the files actually there:
which to copy, which runtime and versions run them, and how. Nothing here imports torch
(``fed-llama export-adapter`` rewrites the README on a device).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fed_llama.common.files import file_sha256, umask_mode, write_text_atomic
from fed_llama.export.host import host_label
from fed_llama.export.runtime import README

log = logging.getLogger(__name__)

MANIFEST = "export_manifest.json"
#: The oldest onnxruntime fed-llama's runtime can use (the LoRA adapter API of switchable
#: adapters): enough for the plain route's graph; graphs with the operators below need more
#: (the export extra asks for 1.23, as the builder's graphs do).
ONNXRUNTIME_FLOOR = "1.20.0"
#: Operators (com.microsoft) -> (oldest onnxruntime that runs them as built here, why).
#: Measured on this project's fp32, int8 and GPTQ int4 exports: onnxruntime 1.22.1 refuses them,
#: 1.23.0 runs them.
OPERATOR_NEEDS: dict[str, tuple[str, str]] = {
    "GroupQueryAttention": ("1.23.0", "the onnxruntime-genai builder's fused attention takes "
                                      "inputs that onnxruntime 1.22 rejects"),
    "GatherBlockQuantized": ("1.23.0", "the embedding lookup reads the LM head's quantized "
                                       "codes as uint8 with a bits attribute and zero points, "
                                       "which this operator accepts since onnxruntime 1.23 "
                                       "(microsoft/onnxruntime#25214)"),
}
#: What each file is for, by name (``adapters/*`` are optional runtime adapters).
ROLES = {
    "model.onnx": "the graph",
    "model.onnx.data": "its weights",
    "genai_config.json": "the decoder's shape and generation settings",
    "tokenizer.json": "the tokenizer",
    "tokenizer_config.json": "special tokens (and the chat template if there is no .jinja)",
    "chat_template.jinja": "the chat template",
    "special_tokens_map.json": "special tokens",
    "adapters/slots.json": "the switchable LoRA weights' names and shapes",
}
TOKENS_CHECKED = 4
MAX_MANIFEST_BYTES = 16 << 20
"""Largest export manifest read (its verification report included)."""


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def runtime_requirements(onnx_file: Path) -> dict[str, Any]:
    """The oldest onnxruntime that runs ``onnx_file`` and why, from its operators; with the
    onnxruntime and onnxruntime-genai versions this export was verified with."""
    import onnx
    import onnxruntime

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    contrib = [n for n in graph.node if n.domain == "com.microsoft"]
    ops = sorted({n.op_type for n in contrib})
    # GatherBlockQuantized without the bits attribute (int4 data types) is older
    needing = {n.op_type for n in contrib if n.op_type != "GatherBlockQuantized"
               or any(a.name == "bits" for a in n.attribute)}
    minimum, reasons = ONNXRUNTIME_FLOOR, []
    for op in ops:
        if op in OPERATOR_NEEDS and op in needing:
            version, why = OPERATOR_NEEDS[op]
            reasons.append(f"{op}: {why}")
            minimum = max(minimum, version, key=_version_key)
    return {"onnxruntime": {"minimum": minimum, "why": reasons,
                            "verified-with": onnxruntime.__version__},
            "contrib-operators": ops}


def check_genai(folder: Path, prompt: Sequence[int], expected: Sequence[int]) -> dict[str, Any]:
    """Load ``folder`` with plain onnxruntime-genai (``og.Model``) and generate
    :data:`TOKENS_CHECKED` greedy tokens after ``prompt``; ``expected``: fed-llama's runtime's
    greedy tokens for the same prompt. What it found, for the manifest and the README."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        return {"loads": False, "error": f"onnxruntime-genai is not installed ({exc})"}
    try:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + TOKENS_CHECKED, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(list(prompt))
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < TOKENS_CHECKED:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        del generator, model
    except Exception as exc:  # onnxruntime-genai raises its own types
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        log.warning("onnxruntime-genai cannot run %s: %s", folder, message)
        return {"version": og.__version__, "loads": False, "error": message}
    same = tokens == list(expected)[:len(tokens)]
    log.info("onnxruntime-genai %s runs the export (greedy tokens %s fed-llama's)",
             og.__version__, "match" if same else "differ from")
    return {"version": og.__version__, "loads": True, "greedy-tokens": len(tokens),
            "matches-fed-llama-runtime": same}


def ship_list(files: Sequence[str]) -> list[tuple[str, str]]:
    """(file, what it is for) of every file a device needs, in the folder's order; the
    manifest and README are listed last (for people, not the runtime)."""
    needed = [(f, ROLES[f]) for f in files if f in ROLES]
    suffix = ".onnx_adapter"
    needed += [(f, f"a runtime adapter (optional: `--lora {Path(f).name[:-len(suffix)]}`)")
               for f in files if f.startswith("adapters/") and f.endswith(suffix)]
    return [*needed, (MANIFEST, "what was exported and verified, with every file's sha256"),
            (README, "this file")]


def device_readme(folder: Path, manifest: dict[str, Any]) -> str:
    """The README.md of ``folder``, from its manifest (``files``, ``runtime``,
    ``verification``) and the sizes of its files."""
    files = sorted(manifest.get("files", {}))
    runtime = manifest.get("runtime", {})
    ort = runtime.get("onnxruntime", {})
    genai = runtime.get("onnxruntime-genai", {})
    source = manifest.get("source_adapter") or {}
    ver = manifest.get("verification", {})
    pooled, host = ver.get("pooled", {}), ver.get("speed-host", {})
    adapters = manifest.get("runtime_adapters", {}).get("adapters", [])
    profile = manifest.get("profile", {}).get("name")
    lines = [f"# {manifest.get('quant', '?')} ONNX export ({profile} profile)", "",
             f"Made by `fed-llama export` {manifest.get('fed_llama_version', '')} on "
             f"{manifest.get('created', '?')} from adapter `{source.get('path', 'none')}` "
             f"(method {manifest.get('method') or source.get('method') or 'lora'}"
             + (f", its {manifest['adapter_branches']} "
                + ("grafted onto the builder's graph" if manifest.get("profile", {}).get(
                    "exporter") == "builder" else "traced into the graph")
                if manifest.get("adapter_branches") else "")
             + ") and backbone "
             f"`{manifest.get('backbone', {}).get('id', '?')}`. "
             f"This file is generated from `{MANIFEST}`, which holds the details.", "",
             "## Files to ship", "",
             "Copy these, keeping their names and the `adapters/` folder; every file must be "
             "readable by the user who runs the model:", ""]
    for name, role in ship_list(files):
        path = folder / name
        big = path.is_file() and path.stat().st_size >= 100_000
        size = f" ({path.stat().st_size / 1e6:.1f} MB)" if big else ""
        lines.append(f"- `{name}`{size}: {role}")
    lines += ["", "## Runtime", "",
              f"- onnxruntime >= {ort.get('minimum', ONNXRUNTIME_FLOOR)} on CPU (verified with "
              f"{ort.get('verified-with', '?')})."]
    lines += [f"  - {why}" for why in ort.get("why", [])]
    lines += ["- For `fed-llama generate --onnx`: Python >= 3.11 with onnxruntime, tokenizers, "
              "numpy and jinja2, and fed-llama itself without its dependencies (no PyTorch): "
              f"`pip install 'onnxruntime>={ort.get('minimum', ONNXRUNTIME_FLOOR)}' tokenizers "
              "numpy jinja2 && pip install --no-deps <fed-llama checkout>`."]
    if genai.get("loads"):
        lines.append(f"- Or plain onnxruntime-genai >= {genai.get('version')} (checked at export: "
                     "`og.Model` loads this folder and generates"
                     + (", the same greedy tokens as fed-llama's runtime)."
                        if genai.get("matches-fed-llama-runtime") else ")."))
    else:
        lines.append("- Not with plain onnxruntime-genai: it could not run this folder at export "
                     f"({genai.get('error', 'not checked')}); use `fed-llama generate --onnx`.")
    system = manifest.get("system_prompt")
    lines += ["", "## Run", ""]
    if isinstance(system, str):
        lines += [f"The adapter was trained with the system message {json.dumps(system)}: ask "
                  "with the same one (`fed-llama generate --onnx` adds it to a prompt without "
                  "one).", ""]
    lines += ["```bash",
              "fed-llama generate --onnx . 'What is the ICD-10-CM code for \"Essential (primary) "
              "hypertension\"?'"]
    if adapters:
        lines.append(f"fed-llama generate --onnx . --lora {adapters[-1]} 'Explain code I10.'")
    lines.append("```")
    if genai.get("loads"):
        lines += ["", "```python", "import json", "import onnxruntime_genai as og", "",
                  "model = og.Model('.')  # this folder", "tokenizer = og.Tokenizer(model)",
                  "messages = ["
                  + (f"{{'role': 'system', 'content': {system!r}}}, "
                     if isinstance(system, str) else "")
                  + "{'role': 'user', 'content': 'Which code is essential hypertension?'}]",
                  "text = tokenizer.apply_chat_template(json.dumps(messages), "
                  "add_generation_prompt=True)",
                  "params = og.GeneratorParams(model)",
                  "params.set_search_options(max_length=256)",
                  "generator = og.Generator(model, params)",
                  "generator.append_tokens(tokenizer.encode(text))",
                  "while not generator.is_done():", "    generator.generate_next_token()",
                  "print(tokenizer.decode(generator.get_sequence(0)))", "```"]
        if adapters:
            lines += ["", "Runtime adapters with onnxruntime-genai: `og.Adapters(model).load("
                      "'adapters/NAME.onnx_adapter', 'NAME')` and `generator.set_active_adapter"
                      "(adapters, 'NAME')` (not checked at export)."]
    speed = ver.get("speed-onnx", {})
    lines += ["", "## Verified at export", "",
              f"- held-out perplexity PyTorch {pooled.get('perplexity-pytorch', 0):.3f} -> ONNX "
              f"{pooled.get('perplexity-onnx', 0):.3f}; top-1 agreement "
              f"{pooled.get('top1-agreement', 0):.3f}; largest logit difference "
              f"{pooled.get('max-logit-diff', 0):.3g}",
              f"- decode {speed.get('decode-tokens-per-s', 0):.1f} tokens/s, prefill "
              f"{speed.get('prefill-ms', 0):.0f} ms {host_label(host)} (the export host: "
              "measure on your device, speed depends on its CPU and how busy it is)", ""]
    return "\n".join(lines)


def exported_system_prompt(folder: Path) -> str | None:
    """The system message the exported adapter was trained with, from the folder's manifest
    (None: none recorded, or no manifest: the chat template's default)."""
    from fed_llama.common.bounded_json import BadJson, loads
    from fed_llama.export.build import ExportError

    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        with path.open("rb") as fh:
            manifest = loads(fh.read(MAX_MANIFEST_BYTES + 1), max_bytes=MAX_MANIFEST_BYTES,
                             constants=True)  # ours, written by json.dumps (NaN allowed)
    except (OSError, BadJson) as exc:
        raise ExportError(f"{path}: not an export manifest ({exc}): export again") from None
    system = manifest.get("system_prompt") if isinstance(manifest, dict) else None
    if not isinstance(system, str | None):
        raise ExportError(f"{path}: its system_prompt is no text: export again")
    return system


def write_readme(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``folder/README.md`` from ``manifest`` (readable as the umask allows)."""
    path = folder / README
    write_text_atomic(path, device_readme(folder, manifest), umask_mode())
    return path


def readme_files(readme: str) -> list[str]:
    """The files a README written by :func:`device_readme` says to ship."""
    section = readme.split("## Files to ship", 1)[1].split("\n## ", 1)[0]
    return [line.split("`")[1] for line in section.splitlines() if line.startswith("- `")]


def write_folder_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the folder's README (from ``manifest`` and the files there) and its manifest,
    with the sha256 of every file but the manifest itself."""
    manifest["files"] = {name: "" for name in _folder_files(folder)}  # the README lists them
    write_readme(folder, manifest)
    manifest["files"] = {name: file_sha256(folder / name) for name in _folder_files(folder)}
    manifest["files"][README] = file_sha256(folder / README)
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, default=str),
                      umask_mode())


def _folder_files(folder: Path) -> list[str]:
    return sorted(name for p in folder.rglob("*") if p.is_file()
                  and (name := str(p.relative_to(folder))) not in (MANIFEST, README))


def summary_line(manifest: dict[str, Any], out: Path) -> str:
    """The line ``fed-llama export`` prints: size, quality (perplexity, top-1 agreement, the
    largest logit difference, task scores) and speed labelled with the host it was
    measured on."""
    ver = manifest["verification"]
    pooled, speed = ver["pooled"], ver["speed-onnx"]
    tasks = ver.get("pooled-tasks", {})
    scores = ""
    if tasks.get("onnx"):
        reference = tasks.get("pytorch", {})
        scores = "; task scores ONNX (PyTorch) " + ", ".join(
            f"{key} {value:.3f} ({reference.get(key, float('nan')):.3f})"
            for key, value in tasks["onnx"].items())
    return (f"{manifest['quant']} export in {out}: {manifest['size_mb']['model']:.0f} MB "
            f"(PyTorch fp32 {manifest['size_mb']['pytorch_fp32']:.0f} MB); held-out perplexity "
            f"PyTorch {pooled['perplexity-pytorch']:.3f} -> ONNX {pooled['perplexity-onnx']:.3f}; "
            f"top-1 agreement {pooled['top1-agreement']:.3f}; largest logit difference "
            f"{pooled['max-logit-diff']:.3g}{scores}; prefill {speed['prefill-ms']:.0f} ms, "
            f"decode {speed['decode-tokens-per-s']:.1f} tokens/s (PyTorch "
            f"{ver['speed-pytorch']['decode-tokens-per-s']:.1f}) "
            f"{host_label(ver.get('speed-host', {}))}")
