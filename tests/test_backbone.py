"""Backbone resolution and loading: every bad input gets a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_backbone

from fed_llama.backbone import load_backbone, resolve_backbone
from fed_llama.backbone.cache import sha256_file
from fed_llama.config import BackboneConfig
from fed_llama.errors import BackboneError


def test_a_local_hf_llama_folder_loads_frozen(tiny_backbone: Path) -> None:
    bb = load_backbone(BackboneConfig(name=str(tiny_backbone)))
    assert bb.model.config.model_type == "llama"
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert bb.tokenizer.chat_template and bb.tokenizer.pad_token == "<|im_end|>"
    assert len(bb.source.sha256) == 64
    assert resolve_backbone(str(tiny_backbone)).sha256 == bb.source.sha256  # stable identity


def test_bf16_precision(tiny_backbone: Path) -> None:
    import torch

    bb = load_backbone(BackboneConfig(name=str(tiny_backbone), precision="bf16"))
    assert bb.model.dtype == torch.bfloat16


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match=r"no such file or folder.*smollm2-135m"):
        resolve_backbone(str(tmp_path / "nowhere"))


def test_non_llama_architecture(tiny_backbone: Path, tmp_path: Path) -> None:
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_backbone, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(BackboneError, match="is a 'gpt2' model; fed-llama trains LLaMA"):
        resolve_backbone(str(other))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match=r"has no config\.json"):
        resolve_backbone(str(tmp_path))


def test_corrupt_weights(tiny_backbone: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_backbone, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BackboneError, match=r"weights in .* could not be loaded"):
        load_backbone(BackboneConfig(name=str(broken)))


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(BackboneError, match="is not a GGUF file"):
        resolve_backbone(str(fake))


def test_a_truncated_gguf_file(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
    with pytest.raises(BackboneError, match="damaged GGUF file"):
        resolve_backbone(str(fake))


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    first = sha256_file(f)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    f.write_bytes(b"abcd")
    assert sha256_file(f) != first


def test_nf4_quantization_loads_4bit_layers(tiny_backbone: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    bb = load_backbone(BackboneConfig(name=str(tiny_backbone), quantization="nf4"))
    layers = [m for m in bb.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every projection of both blocks
    assert getattr(layers[0].weight, "quant_type", None) == "nf4"


def test_an_nf4_backbone_keeps_no_mapping_of_its_fp32_weights_file(tmp_path: Path) -> None:
    """The tensors NF4 leaves unquantized are copied out of the memory-mapped safetensors file,
    so its pages (the fp32 weights quantization read) are not resident for the whole run."""
    pytest.importorskip("bitsandbytes")
    import gc

    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps (Linux)")
    # a backbone of its own: other tests' models may still map the shared one's file
    own = build_tiny_backbone(tmp_path / "tiny")
    bb = load_backbone(BackboneConfig(name=str(own), quantization="nf4"))
    gc.collect()
    weights = str(bb.source.model_dir / "model.safetensors")
    assert weights not in maps.read_text()
    fp32 = load_backbone(BackboneConfig(name=str(own)))
    assert weights in maps.read_text()  # the fp32 backbone's tensors are the mapping itself
    del fp32


@pytest.mark.parametrize("method", ["lora", "llama-adapter", "llama-adapter-v2", "excitor"])
def test_every_method_still_trains_on_nf4_after_an_evaluation_pass(tiny_backbone: Path,
                                                                   method: str) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks NF4 weights for inference on the first
    eval-mode pass and gradients stop reaching anything behind them; a site evaluates before
    it trains, so every trainable tensor must still get a non-zero gradient afterwards."""
    pytest.importorskip("bitsandbytes")
    import torch

    from fed_llama.adapter.methods import method_of
    from fed_llama.config.train import LoraConfig
    from fed_llama.training.lora import attach_lora

    bb = load_backbone(BackboneConfig(name=str(tiny_backbone), quantization="nf4"))
    if method == "lora":
        model = attach_lora(bb.model, LoraConfig(r=4), seed=0)
        with torch.no_grad():  # B = 0: give A a gradient path, as after one step
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    else:
        spec = method_of(method)
        model = spec.attach(bb.model, spec.config_type(**{
            "llama-adapter": {"layers": 2}, "llama-adapter-v2": {"prompt_layers": 2},
            "excitor": {"layers": 2, "rank": 4}}[method]), 0)
        with torch.no_grad():  # gates open a little, as after one step
            for name, p in model.named_parameters():
                if name.endswith(("gate", "adaption_gate")):
                    p.fill_(0.1)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the held-out evaluation before training
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert not dead


def test_decoding_with_the_cache_gives_the_full_forward_logits(tiny_backbone: Path) -> None:
    """The cache goes in and comes out under the name the installed transformers uses."""
    import inspect

    import torch

    from fed_llama.backbone.kv_cache import cache_argument, returned_cache

    model = load_backbone(BackboneConfig(name=str(tiny_backbone))).model
    argument = cache_argument(model)
    assert argument in inspect.signature(model.forward).parameters
    ids = torch.tensor([[5, 9, 2, 7, 11, 3]])
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t:t + 1], use_cache=True, **{argument: returned_cache(out)})
            torch.testing.assert_close(out.logits[0, -1], full[0, t], atol=1e-5, rtol=1e-5)
