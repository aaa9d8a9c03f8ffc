"""The on-disk cache: GGUF backbones converted once to safetensors, and file hashes.

The cache lives in ``$FED_LLAMA_CACHE`` or ``~/.cache/fed-llama``. A converted backbone sits in
``backbones/<sha256 of the source file>/``; it is written to a temporary folder beside it and
renamed into place, so an interrupted conversion never leaves a half-written backbone behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fed_llama.common.files import file_sha256, write_text_atomic
from fed_llama.errors import BackboneError

log = logging.getLogger(__name__)

CACHE_ENV = "FED_LLAMA_CACHE"
GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    """The cache folder: ``$FED_LLAMA_CACHE`` or ``~/.cache/fed-llama``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "fed-llama"
    return root


def sha256_file(path: Path) -> str:
    """The sha256 of a file, remembered in the cache by (path, size, mtime) to skip re-reading."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_root() / "hashes.json"
    try:
        memo: dict[str, str] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    memo = {k: v for k, v in memo.items() if Path(k.split("|")[0]).exists()}  # prune gone files
    memo[key] = file_sha256(path)
    try:
        write_text_atomic(memo_path, json.dumps(memo, indent=1))
    except OSError as exc:  # a read-only cache only costs the re-hash next time
        log.debug("could not remember the hash of %s: %s", path, exc)
    return memo[key]


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file, or BackboneError if it is not readable GGUF."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise BackboneError(
            f"backbone file {str(path)!r} is not a GGUF file (it does not start with 'GGUF'): "
            "check that the download is complete, or give a Hugging Face model directory")
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        fld = reader.fields["general.architecture"]
        return bytes(fld.parts[fld.data[0]]).decode("utf-8")
    except Exception as exc:  # gguf raises many kinds of errors on a damaged file
        raise BackboneError(
            f"backbone file {str(path)!r} is a damaged GGUF file ({type(exc).__name__}: {exc}): "
            "download it again") from None


def converted_dir(gguf_path: Path, sha256: str) -> Path:
    """Convert a GGUF LLaMA to a safetensors model folder in the cache (once) and return it."""
    target = cache_root() / "backbones" / sha256
    if (target / "config.json").is_file():
        return target
    arch = gguf_architecture(gguf_path)
    if arch != "llama":
        raise BackboneError(
            f"backbone file {str(gguf_path)!r} holds a {arch!r} model; fed-llama trains "
            "LLaMA-architecture models (LlamaForCausalLM): give a LLaMA GGUF file or directory")
    log.info("converting %s to safetensors in %s (once; about 30 s)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{sha256[:12]}.", suffix=".tmp"))
    try:
        _convert(gguf_path, tmp)
        (tmp / "source.json").write_text(json.dumps(
            {"source": str(gguf_path.resolve()), "sha256": sha256}, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise BackboneError(
            f"backbone file {str(gguf_path)!r} could not be converted "
            f"({type(exc).__name__}: {exc}): check that it is a complete LLaMA GGUF file") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained
    model = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a LlamaConfig at run time
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
