"""Training maths and the adapter round trip, on a tiny random LLaMA."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Literal

import pytest
import torch
from conftest import qa_records

from fed_llama.adapter import MANIFEST, load_adapter, read_manifest, save_adapter
from fed_llama.backbone import load_backbone
from fed_llama.config import BackboneConfig, DataConfig, LoraConfig, OptimConfig, TrainConfig
from fed_llama.data.batching import collate
from fed_llama.data.source import load_site_data
from fed_llama.errors import AdapterError
from fed_llama.training.job import run_training
from fed_llama.training.loop import MIN_LR_RATIO, lr_lambda, train_adapter
from fed_llama.training.lora import adapter_state, attach_lora, trainable_parameters
from fed_llama.training.loss import answer_nll, answer_token_nll, example_mean_nll, heldout_loss


def _setup(tiny_backbone: Path, data_path: Path,  # type: ignore[no-untyped-def]
           quantization: Literal["none", "nf4"] = "none"):
    bb = load_backbone(BackboneConfig(name=str(tiny_backbone), quantization=quantization))
    data = load_site_data(DataConfig(source=str(data_path)), bb.tokenizer, seed=0)
    return bb, data


def test_only_the_adapter_is_trainable(tiny_backbone: Path, write_jsonl) -> None:  # type: ignore[no-untyped-def]
    bb, _ = _setup(tiny_backbone, write_jsonl(qa_records(10)))
    model = attach_lora(bb.model, LoraConfig(r=4), seed=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # r * (in + out) per adapted projection; q: 64->64, k,v: 64->32, o: 64->64; 2 layers
    assert sum(p.numel() for p in trainable_parameters(model)) == 2 * 4 * (128 + 96 + 96 + 128)


def test_answer_loss_equals_the_masked_full_vocabulary_loss(tiny_backbone: Path,  # type: ignore[no-untyped-def]
                                                            write_jsonl) -> None:
    bb, data = _setup(tiny_backbone, write_jsonl(qa_records(10)))
    batch = collate(data.train[:4], bb.tokenizer.pad_token_id)
    nll, n = answer_nll(bb.model, batch)
    reference = bb.model(**batch).loss  # HF: mean over labelled tokens of the full logits
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert float(nll) / n == pytest.approx(float(reference), rel=1e-5)


def test_example_averaging_weighs_each_answer_once_whatever_its_length(
        tiny_backbone: Path, write_jsonl) -> None:  # type: ignore[no-untyped-def]
    bb, data = _setup(tiny_backbone, write_jsonl(qa_records(10)))
    batch = collate(data.train[:4], bb.tokenizer.pad_token_id)
    nll, rows = answer_token_nll(bb.model, batch)
    # by hand: each row's own masked full-vocabulary loss (HF's mean over its labels)
    per_row = [float(bb.model(**{k: v[i:i + 1] for k, v in batch.items()}).loss)
               for i in range(4)]
    assert float(example_mean_nll(nll, rows, 4)) == pytest.approx(sum(per_row), rel=1e-5)
    assert float(nll.sum()) == pytest.approx(float(answer_nll(bb.model, batch)[0]), rel=1e-6)


def test_a_step_averaged_over_examples_differs_from_one_over_tokens(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl) -> None:
    records = qa_records(16)
    for i, r in enumerate(records):  # answers of very different lengths
        r["output"] = "acute" if i % 2 else " ".join(["Essential (primary) hypertension"] * 6)
    path = write_jsonl(records)
    states = {}
    for average in ("tokens", "examples"):
        bb, data = _setup(tiny_backbone, path)
        pad = bb.tokenizer.pad_token_id
        model = attach_lora(bb.model, LoraConfig(r=4, dropout=0.0), seed=0)
        cfg = OptimConfig(max_steps=2, lr=1e-2, warmup_steps=0, batch_size=8,
                          group_by_length=False, loss_average=average)
        stats = train_adapter(model, data.train, cfg, pad, progress=False)
        assert all(math.isfinite(x) for x in stats.losses)
        states[average] = adapter_state(model)
    assert any(not torch.allclose(states["tokens"][k], states["examples"][k])
               for k in states["tokens"])


def test_warmup_then_cosine_schedule() -> None:
    assert lr_lambda(0, warmup=4, total=20) == pytest.approx(0.25)
    assert lr_lambda(3, warmup=4, total=20) == pytest.approx(1.0)
    assert lr_lambda(4, warmup=4, total=20) == pytest.approx(1.0)
    assert lr_lambda(12, warmup=4, total=20) == pytest.approx((1 + MIN_LR_RATIO) / 2)
    assert lr_lambda(20, warmup=4, total=20) == pytest.approx(MIN_LR_RATIO)


def test_rounds_share_one_schedule_as_one_run_would(tiny_backbone: Path,  # type: ignore[no-untyped-def]
                                                     write_jsonl) -> None:
    bb, data = _setup(tiny_backbone, write_jsonl(qa_records(16)))
    model = attach_lora(bb.model, LoraConfig(r=4, dropout=0.0), seed=0)
    pad = bb.tokenizer.pad_token_id
    cfg = OptimConfig(max_steps=4, lr=1e-2, warmup_steps=2, batch_size=4)
    rounds = [train_adapter(model, data.train, cfg, pad, progress=False,
                            schedule=(k * 4, 12)).lrs for k in range(3)]
    whole = [1e-2 * lr_lambda(s, warmup=2, total=12) for s in range(12)]
    assert [lr for r in rounds for lr in r] == pytest.approx(whole)
    assert rounds[0][0] == pytest.approx(0.5e-2)  # warm-up in the first round only
    assert rounds[2][0] < rounds[1][0] < rounds[0][-1]
    with pytest.raises(ValueError, match="offset"):
        train_adapter(model, data.train, cfg, pad, progress=False, schedule=(12, 12))


def test_a_run_continued_with_its_optimizer_state_equals_one_uninterrupted_run(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl) -> None:
    bb, data = _setup(tiny_backbone, write_jsonl(qa_records(16)))
    items, pad = data.train[:8], bb.tokenizer.pad_token_id
    cfg = OptimConfig(max_steps=3, lr=1e-2, warmup_steps=1, batch_size=8)  # one batch: all 8

    def run(halves: bool, carry: bool) -> dict[str, torch.Tensor]:
        model = attach_lora(load_backbone(BackboneConfig(name=str(tiny_backbone))).model,
                            LoraConfig(r=4, dropout=0.0), seed=0)
        if not halves:
            train_adapter(model, items, dataclasses.replace(cfg, max_steps=6), pad,
                          progress=False)
        else:
            first = train_adapter(model, items, cfg, pad, progress=False, schedule=(0, 6),
                                  keep_optimizer=True)
            assert float(first.optimizer_state["step"]) == 3
            train_adapter(model, items, cfg, pad, progress=False, schedule=(3, 6),
                          resume_optimizer=first.optimizer_state if carry else None)
        return adapter_state(model)

    whole, carried, restarted = run(False, False), run(True, True), run(True, False)
    for key in whole:
        torch.testing.assert_close(carried[key], whole[key], rtol=1e-4, atol=1e-6)
    # restarting AdamW's moments (bias correction from step 1 again) lands elsewhere
    assert max(float((restarted[k] - whole[k]).abs().max()) for k in whole) > 1e-4


def test_an_optimizer_state_for_other_parameters_is_refused(tiny_backbone: Path,  # type: ignore[no-untyped-def]
                                                             write_jsonl) -> None:
    bb, data = _setup(tiny_backbone, write_jsonl(qa_records(8)))
    model = attach_lora(bb.model, LoraConfig(r=4, dropout=0.0), seed=0)
    cfg, pad = OptimConfig(max_steps=1, batch_size=4), bb.tokenizer.pad_token_id
    saved = train_adapter(model, data.train, cfg, pad, progress=False,
                          keep_optimizer=True).optimizer_state
    name = next(k for k in saved if k.startswith("exp_avg/"))
    with pytest.raises(ValueError, match="missing"):
        train_adapter(model, data.train, cfg, pad, progress=False,
                      resume_optimizer={k: v for k, v in saved.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        train_adapter(model, data.train, cfg, pad, progress=False,
                      resume_optimizer={**saved, name: torch.zeros(3)})


def test_a_few_steps_lower_the_loss(tiny_backbone: Path, write_jsonl) -> None:  # type: ignore[no-untyped-def]
    bb, data = _setup(tiny_backbone, write_jsonl(qa_records(40)))
    model = attach_lora(bb.model, LoraConfig(r=8, dropout=0.0), seed=0)
    pad = bb.tokenizer.pad_token_id
    before = heldout_loss(model, data.train, 8, pad)
    stats = train_adapter(model, data.train, OptimConfig(max_steps=30, lr=1e-2, warmup_steps=2,
                                                         batch_size=8, grad_accum=2),
                          pad, progress=False)
    after = heldout_loss(model, data.train, 8, pad)
    assert stats.steps == 30 and stats.tokens > 0
    assert after.loss < before.loss - 0.5
    assert after.perplexity == pytest.approx(math.exp(after.loss))


def test_qlora_gradients_reach_the_adapter_and_lower_the_loss(tiny_backbone: Path,  # type: ignore[no-untyped-def]
                                                              write_jsonl) -> None:
    pytest.importorskip("bitsandbytes")
    bb, data = _setup(tiny_backbone, write_jsonl(qa_records(40)), quantization="nf4")
    model = attach_lora(bb.model, LoraConfig(r=8, dropout=0.0), seed=0)
    pad = bb.tokenizer.pad_token_id
    nll, n = answer_nll(model, collate(data.train[:4], pad))
    (nll / n).backward()
    # at initialization B = 0, so the gradient reaches every B (and A's is exactly zero)
    b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(b_grads) == 2 * 4
    assert all(g is not None and float(g.abs().sum()) > 0 for g in b_grads)
    model.zero_grad()
    before = heldout_loss(model, data.train, 8, pad)
    train_adapter(model, data.train, OptimConfig(max_steps=15, lr=1e-2, warmup_steps=2),
                  pad, progress=False)
    assert heldout_loss(model, data.train, 8, pad).loss < before.loss


def test_saved_adapter_reloads_with_plain_peft_and_reproduces_the_loss(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = write_jsonl(qa_records(30))
    cfg = TrainConfig(backbone=BackboneConfig(name=str(tiny_backbone)),
                      data=DataConfig(source=str(path)),
                      train=OptimConfig(max_steps=5, warmup_steps=1, lr=1e-2))
    out = tmp_path / "adapter"
    metrics = run_training(cfg, out, progress=False)
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "README.md",  # peft's card
                                               "adapter_model.safetensors", MANIFEST}
    manifest = read_manifest(out)
    assert manifest["method"] == "lora" and manifest["lora"]["r"] == 8
    assert manifest["backbone"]["sha256"] == load_backbone(cfg.backbone).source.sha256
    assert manifest["data"]["train_records"] == 27

    base = AutoModelForCausalLM.from_pretrained(str(tiny_backbone))
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    bb = load_backbone(cfg.backbone)
    data = load_site_data(cfg.data, bb.tokenizer, seed=0)
    again = heldout_loss(plain, data.heldout, 16, bb.tokenizer.pad_token_id)
    assert again.loss == pytest.approx(metrics["heldout_after"]["loss"], abs=1e-4)
    assert metrics["heldout_after"]["loss"] != pytest.approx(metrics["heldout_before"]["loss"])


def test_an_existing_output_folder_is_never_overwritten_without_force(
        tiny_backbone: Path, tmp_path: Path) -> None:
    bb = load_backbone(BackboneConfig(name=str(tiny_backbone)))
    model = attach_lora(bb.model, LoraConfig(r=2), seed=0)
    out = tmp_path / "a"
    save_adapter(model, out, {"note": "first"})
    with pytest.raises(AdapterError, match=r"already exists.*--force"):
        save_adapter(model, out, {"note": "second"})
    assert json.loads((out / MANIFEST).read_text())["note"] == "first"
    save_adapter(model, out, {"note": "second"}, force=True)
    assert json.loads((out / MANIFEST).read_text())["note"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp folders left


def test_a_corrupted_or_mismatched_adapter_is_refused(tiny_backbone: Path,
                                                      tmp_path: Path) -> None:
    bb = load_backbone(BackboneConfig(name=str(tiny_backbone)))
    model = attach_lora(bb.model, LoraConfig(r=2), seed=0)
    out = save_adapter(model, tmp_path / "a", {"backbone": {"id": "x", "sha256": "0" * 64}})
    fresh = load_backbone(BackboneConfig(name=str(tiny_backbone)))
    with pytest.raises(AdapterError, match="was trained on backbone 'x'"):
        load_adapter(fresh.model, out, backbone_sha256=fresh.source.sha256)
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x01" * 8)
    with pytest.raises(AdapterError, match="does not match the sha256 in its manifest"):
        load_adapter(fresh.model, out)
    (out / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"lacks adapter_config\.json"):
        load_adapter(fresh.model, out)


def test_wrong_shapes_are_refused_with_a_clear_error(tiny_backbone: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bb = load_backbone(BackboneConfig(name=str(tiny_backbone)))
    out = save_adapter(attach_lora(bb.model, LoraConfig(r=2), seed=0), tmp_path / "a", {})
    (out / MANIFEST).unlink()  # a plain peft folder: no hashes to catch the edit
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in tensors.items()},
              out / "adapter_model.safetensors")
    fresh = load_backbone(BackboneConfig(name=str(tiny_backbone)))
    with pytest.raises(AdapterError, match="does not fit this backbone"):
        load_adapter(fresh.model, out)


BNB_PROBE = """
import sys
from fed_llama.backbone import load_backbone
from fed_llama.config import BackboneConfig, LoraConfig
from fed_llama.training.lora import adapter_state, attach_lora, use_rank

plain = attach_lora(load_backbone(BackboneConfig(name=sys.argv[1])).model, LoraConfig(r=8), 0)
use_rank(plain, LoraConfig(r=8), 4, seed=0)
print("after plain:", "bitsandbytes" in sys.modules, len(adapter_state(plain)))
nf4 = load_backbone(BackboneConfig(name=sys.argv[1], quantization="nf4")).model
nf4 = attach_lora(nf4, LoraConfig(r=8), 0)
import bitsandbytes as bnb
print("nf4 layers:", sum(isinstance(m.base_layer, bnb.nn.Linear4bit)
                         for m in nf4.modules() if hasattr(m, "lora_A")))
"""


def test_lora_on_a_plain_backbone_does_not_import_bitsandbytes_and_nf4_still_gets_it(
        tiny_backbone: Path) -> None:
    """peft imports bitsandbytes on its first wrap whenever it is installed (1.3 s in every
    ClientApp process); an unquantized backbone needs none of it, and an NF4 backbone loaded
    later in the same process still has its LoRA layers wrap bitsandbytes' Linear4bit."""
    pytest.importorskip("bitsandbytes")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", BNB_PROBE, str(tiny_backbone)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "after plain: False 16" in lines  # q_proj, v_proj in 4 layers: A and B each
    assert "nf4 layers: 8" in lines
