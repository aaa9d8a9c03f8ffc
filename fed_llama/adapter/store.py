"""Adapters on disk: peft's format plus a fed-llama manifest.

An adapter folder holds what ``PeftModel.save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``, loadable by plain ``PeftModel.from_pretrained``; for the methods
peft lacks, LLaMA-Adapter V2 and Excitor, the same two files in our own format, see
:mod:`fed_llama.adapter.methods.own_format`) and
``fed_llama_manifest.json``: the backbone's id and sha256, the method, the rank, a data
summary, metrics, and the sha256 of each file. A folder is written to a temporary folder beside
its target and renamed into place, so a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fed_llama.common.bounded_json import BadJson, loads
from fed_llama.common.files import file_sha256, replace_dir
from fed_llama.errors import AdapterError

MANIFEST = "fed_llama_manifest.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
SEALED_WEIGHTS = "adapter_model.safetensors.hpke"
"""The weights of a checkpoint encrypted at rest (in place of ``adapter_model.safetensors``)."""
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
"""Largest manifest file read."""


def check_output_dir(out: Path, force: bool, flag: str = "--out") -> None:
    """Refuse to overwrite a non-empty folder unless ``force``."""
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{flag} {str(out)!r} is a file, not a folder: choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AdapterError(f"{flag} {str(out)!r} already exists and is not empty: choose another "
                           "folder or pass --force to replace it")


def save_adapter(model: Any, out: Path, manifest: dict[str, Any], *, force: bool = False) -> Path:
    """Save the peft adapter of ``model`` and ``manifest`` into ``out`` atomically."""
    return _write_adapter_dir(lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True),
                              out, manifest, force)


def save_adapter_state(state: dict[str, Any], peft_config: Any, out: Path,
                       manifest: dict[str, Any], *, force: bool = False,
                       encrypt: Callable[[bytes], bytes] | None = None) -> Path:
    """Save adapter tensors (peft's saved names) with their peft config, as peft would.

    For the aggregator, which holds the global adapter's tensors but no model: the folder
    loads with plain ``PeftModel.from_pretrained`` like one written by ``save_pretrained``.
    With ``encrypt``, the weights are written only encrypted (:data:`SEALED_WEIGHTS`) and the
    folder must be decrypted before use (``fed-llama keys decrypt-checkpoint``).
    """
    from safetensors.torch import save

    def write(tmp: Path) -> None:
        peft_config.save_pretrained(str(tmp))
        tensors = {k: v.detach().float().contiguous() for k, v in state.items()}
        data = save(tensors, metadata={"format": "pt"})
        if encrypt is None:
            (tmp / "adapter_model.safetensors").write_bytes(data)
        else:
            (tmp / SEALED_WEIGHTS).write_bytes(encrypt(data))

    return _write_adapter_dir(write, out, manifest, force)


def write_adapter_files(files: dict[str, bytes], out: Path, manifest: dict[str, Any], *,
                        force: bool = False) -> Path:
    """Write an adapter folder from its files' bytes (e.g. a decrypted checkpoint)."""
    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    return _write_adapter_dir(write, out, manifest, force)


def _write_adapter_dir(write: Callable[[Path], None], out: Path, manifest: dict[str, Any],
                       force: bool) -> Path:
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        names = [n for n in (*PEFT_FILES, SEALED_WEIGHTS) if (tmp / n).is_file()]
        full = dict(manifest, format_version=FORMAT_VERSION,
                    files={name: file_sha256(tmp / name) for name in names})
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
        replace_dir(tmp, out)
    except OSError as exc:  # a full disk's write() names no file: name the folder
        if exc.filename is None:
            exc.filename = str(out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_manifest(adapter_dir: Path, *, sealed: bool = False) -> dict[str, Any]:
    """Check an adapter folder's files and hashes; return its manifest ({} for plain peft).

    An encrypted checkpoint is refused with how to decrypt it, unless ``sealed``.
    """
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter {str(adapter_dir)!r} is not a folder: give the folder "
                           "written by `fed-llama train` (adapter_config.json + "
                           "adapter_model.safetensors)")
    if (adapter_dir / SEALED_WEIGHTS).is_file():
        if not sealed:
            raise AdapterError(
                f"adapter {str(adapter_dir)!r} is encrypted at rest (security."
                "encrypt_checkpoints): decrypt a copy first with fed-llama keys "
                f"decrypt-checkpoint {adapter_dir} --dir <the aggregator's key folder> "
                "--out <folder>")
        required: tuple[str, ...] = ("adapter_config.json", SEALED_WEIGHTS, MANIFEST)
    else:
        required = PEFT_FILES
    missing = [n for n in required if not (adapter_dir / n).is_file()]
    if missing:
        raise AdapterError(f"adapter {str(adapter_dir)!r} lacks {', '.join(missing)}: it is not "
                           "a complete peft adapter folder")
    path = adapter_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as fh:
            manifest = loads(fh.read(MAX_MANIFEST_BYTES + 1), max_bytes=MAX_MANIFEST_BYTES)
        if not isinstance(manifest, dict):
            raise BadJson("not a JSON object")
    except (OSError, BadJson) as exc:
        raise AdapterError(f"adapter {str(adapter_dir)!r}: {MANIFEST} is not a fed-llama "
                           f"manifest ({exc}): copy the adapter again") from None
    if not isinstance(manifest.get("system_prompt"), str | None):
        raise AdapterError(f"adapter {str(adapter_dir)!r}: {MANIFEST} has a system_prompt that "
                           "is no text: copy the adapter again")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(
            name in (*PEFT_FILES, SEALED_WEIGHTS) and isinstance(digest, str)
            for name, digest in files.items()):
        raise AdapterError(f"adapter {str(adapter_dir)!r}: {MANIFEST} lists files other than "
                           f"{', '.join((*PEFT_FILES, SEALED_WEIGHTS))} or a hash that is no "
                           "text: copy the adapter again")
    for name, expected in files.items():
        if not (adapter_dir / name).is_file() or file_sha256(adapter_dir / name) != expected:
            raise AdapterError(f"adapter {str(adapter_dir)!r}: {name} does not match the sha256 "
                               "in its manifest (corrupted or edited): copy the adapter again")
    return manifest


def load_adapter(model: Any, adapter_dir: Path, backbone_sha256: str | None = None) -> Any:
    """Wrap ``model`` with the adapter in ``adapter_dir`` (inference mode): a peft folder (LoRA,
    LLaMA-Adapter V1) with peft, one of ours (V2, Excitor) with its documented loader.

    The manifest's backbone hash must match ``backbone_sha256`` when both are known: an adapter
    trained on other weights would load without complaint and give wrong answers.
    """
    from fed_llama.adapter.peft_import import peft_module
    from fed_llama.common.notices import without_checkpointing_notice

    PeftModel = peft_module().PeftModel
    manifest = read_manifest(adapter_dir)
    trained_on = manifest.get("backbone", {}).get("sha256")
    if backbone_sha256 and trained_on and trained_on != backbone_sha256:
        raise AdapterError(
            f"adapter {str(adapter_dir)!r} was trained on backbone "
            f"{manifest['backbone'].get('id')!r} (sha256 {trained_on[:12]}...), not on the one "
            f"loaded (sha256 {backbone_sha256[:12]}...): use --backbone "
            f"{manifest['backbone'].get('id')}")
    from fed_llama.adapter.methods import own_format

    try:
        if own_format.read_config(adapter_dir) is not None:  # LLaMA-Adapter V2, Excitor
            model = own_format.load_into(model, adapter_dir)
        else:
            with without_checkpointing_notice():
                model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        for param in model.parameters():  # peft's adaption prompts stay trainable otherwise
            param.requires_grad_(False)
        return model
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(f"adapter {str(adapter_dir)!r} does not fit this backbone "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
