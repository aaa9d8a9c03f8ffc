"""Every adapter method through the product: config, `fed-llama train/eval/generate`, a
federation on Flower's Simulation Engine, its checkpoints, SecAgg+, admission and --resume.

On the tiny random LLaMA of conftest.py (2 layers, GQA). The methods' own maths (init equals
the backbone, parameter counts, KV cache, folding) is tests/test_adapter_methods.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import qa_records

from fed_llama.adapter.methods import METHODS
from fed_llama.adapter.store import read_manifest
from fed_llama.cli.main import main
from fed_llama.config.adapter import METHOD_NAMES
from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.config.train import TrainConfig
from fed_llama.errors import ConfigError

OTHERS = ("llama-adapter", "llama-adapter-v2", "excitor")


def _refusal(cls: type, data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(cls, data, source="test.toml")
    return str(info.value)


def test_the_config_names_every_method() -> None:
    assert METHOD_NAMES == METHODS


@pytest.mark.parametrize("cls", [ScenarioConfig, TrainConfig])
def test_each_method_reads_its_own_section(cls: type) -> None:
    v2 = build_config(cls, {"adapter": {"method": "llama-adapter-v2"},
                            "llama_adapter_v2": {"prompts": False,
                                                 "target_modules": ["q_proj", "v_proj"]}},
                      source="t")
    assert v2.method_config().prompts is False
    assert v2.method_config().target_modules == ("q_proj", "v_proj")
    ex = build_config(cls, {"adapter": {"method": "excitor"}, "excitor": {"rank": 4}}, source="t")
    assert ex.method_config().rank == 4 and ex.method_settings()["rank"] == 4
    assert build_config(cls, {}, source="t").method_config() == build_config(
        cls, {}, source="t").lora


@pytest.mark.parametrize(("data", "reason"), [
    ({"excitor": {"rank": 4}},
     "[excitor] configures excitor, but adapter.method = 'lora': remove [excitor], or set "
     "adapter.method = 'excitor'"),
    ({"adapter": {"method": "excitor"}, "llama_adapter": {}},
     "[llama_adapter] configures llama-adapter, but adapter.method = 'excitor'"),
    ({"adapter": {"method": "llama-adapter"}, "lora": {"r": 4}},
     "lora.r = 4 is a LoRA setting, but adapter.method = 'llama-adapter': remove it from "
     "[lora], or set adapter.method = 'lora'"),
    ({"adapter": {"method": "bitfit"}}, "adapter.method must be one of"),
    ({"adapter": {"method": "excitor"}, "excitor": {"rank": 0}}, "excitor.rank must be in"),
    ({"adapter": {"method": "excitor"}, "excitor": {"depth": 2}}, "unknown key excitor.depth"),
])
@pytest.mark.parametrize("cls", [ScenarioConfig, TrainConfig])
def test_what_does_not_fit_the_method_is_refused_with_its_reason(
        cls: type, data: dict[str, Any], reason: str) -> None:
    assert reason in _refusal(cls, data)


@pytest.mark.parametrize(("federation", "reason"), [
    ({"aggregation": "exact"}, "federation.aggregation = 'exact' works on LoRA's A and B "
     "factors, but adapter.method = 'llama-adapter-v2': set aggregation = 'factors'"),
    ({"aggregation": "ffa"}, "federation.aggregation = 'ffa' works on LoRA's"),
    ({"site_ranks": [2, 4, 8], "aggregation": "exact"},
     "federation.site_ranks gives LoRA ranks, but adapter.method = 'llama-adapter-v2': leave "
     "site_ranks empty"),
])
def test_lora_only_federation_options_are_refused_with_another_method(
        federation: dict[str, Any], reason: str) -> None:
    assert reason in _refusal(ScenarioConfig, {"adapter": {"method": "llama-adapter-v2"},
                                               "federation": federation})


def test_every_problem_is_listed_in_one_error() -> None:
    text = _refusal(ScenarioConfig, {"adapter": {"method": "excitor"}, "lora": {"alpha": 8},
                                     "llama_adapter_v2": {}, "federation": {"aggregation": "ffa"}})
    assert text.startswith("test.toml: 3 problems:")


def test_a_site_refuses_a_run_of_another_method_or_other_settings() -> None:
    from fed_llama.config.run_settings import federation_settings, site_scenario
    from fed_llama.config.site import SiteConfig

    run = build_config(ScenarioConfig, {"adapter": {"method": "excitor"},
                                        "excitor": {"rank": 4}}, source="t")
    settings = federation_settings(run)
    assert "llama_adapter" not in json.loads(settings)  # only the chosen method's settings
    site = {"name": "cardiology", "source": "icd10:cardiology"}
    with pytest.raises(ConfigError, match="the run trains excitor, the site agreed to lora"):
        site_scenario(settings, build_config(SiteConfig, site, source="s"))
    with pytest.raises(ConfigError, match=r"the run's excitor\.rank is 4, the site agreed to 16"):
        site_scenario(settings, build_config(SiteConfig, {**site, "method": "excitor"},
                                             source="s"))
    agreed = build_config(SiteConfig, {**site, "method": "excitor", "excitor": {"rank": 4}},
                          source="s")
    scenario, index = site_scenario(settings, agreed)
    assert scenario.method_config() == run.method_config() and index == 0
    nf4 = federation_settings(build_config(ScenarioConfig, {
        "adapter": {"method": "excitor"}, "excitor": {"rank": 4},
        "backbone": {"quantization": "nf4"}}, source="t"))
    with pytest.raises(ConfigError, match=r"the run's backbone\.quantization is 'nf4', the "
                       r"site agreed to 'none'"):
        site_scenario(nf4, agreed)
    assert "LoRA on the NF4 backbone is method = 'qlora'" in _refusal(
        SiteConfig, {**site, "quantization": "nf4"})
    assert "[excitor] configures excitor, but method = 'lora'" in _refusal(
        SiteConfig, {**site, "excitor": {}})


def test_an_update_that_does_not_fit_the_method_is_refused_with_its_reason() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fed_llama.adapter.methods import method_of
    from fed_llama.adapter.methods.excitor.config import ExcitorConfig
    from fed_llama.crypto.refusal import Refused
    from fed_llama.server.admission import check_update
    from fed_llama.training.method import method_state

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = method_of("excitor").attach(LlamaForCausalLM(config), ExcitorConfig(rank=4), 0)
    current = method_state(model, "excitor")
    check_update({k: v + 0.01 for k, v in current.items()}, current)  # fits: admitted
    name = next(k for k in current if k.endswith("key_branch.up"))
    renamed = {(k + "x" if k == name else k): v for k, v in current.items()}
    with pytest.raises(Refused) as info:
        check_update(renamed, current)
    assert info.value.reason == "wrong-names"
    reshaped = dict(current, **{name: torch.zeros(5, 32)})
    with pytest.raises(Refused) as info:
        check_update(reshaped, current)
    assert info.value.reason == "wrong-shape" and name in str(info.value)


def _train_config(backbone: Path, data: Path, method: str, quantization: str = "none"
                  ) -> TrainConfig:
    return build_config(TrainConfig, {
        "backbone": {"name": str(backbone), "quantization": quantization},
        "data": {"source": str(data)}, "adapter": {"method": method},
        "train": {"max_steps": 6, "warmup_steps": 1, "lr": 5e-2}}, source="t")


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("method", OTHERS)
def test_train_save_reload_reproduces_the_heldout_loss(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path, method: str,
        quantization: str) -> None:
    from fed_llama.data.source import load_site_data
    from fed_llama.inference.model import load_model
    from fed_llama.training.job import run_training
    from fed_llama.training.loss import heldout_loss

    cfg = _train_config(tiny_backbone, write_jsonl(qa_records(30)), method, quantization)
    out = tmp_path / "adapter"
    metrics = run_training(cfg, out, progress=False)
    manifest = read_manifest(out)
    assert manifest["method"] == method and manifest["adapter"]["method"] == method
    assert manifest["adapter"]["settings"] == cfg.method_settings()
    assert manifest["backbone"]["quantization"] == quantization
    after = metrics["heldout_after"]["loss"]
    # it trained: the loss moved by well over the 1e-5 the reload must reproduce (Excitor,
    # whose gates start at 0, moves least in 6 steps on the random model: about 3e-4)
    assert abs(after - metrics["heldout_before"]["loss"]) > 1e-4

    loaded = load_model(None, out)  # the backbone as the adapter was trained (NF4 too)
    tok = loaded.backbone.tokenizer
    data = load_site_data(cfg.data, tok, cfg.train.seed)
    again = heldout_loss(loaded.model, data.heldout, cfg.train.eval_batch_size,
                         tok.pad_token_id)
    assert abs(again.loss - after) < 1e-5
    assert not any(p.requires_grad for p in loaded.model.parameters())
    if method == "llama-adapter":  # a plain peft folder
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(tiny_backbone))
        plain = PeftModel.from_pretrained(base, str(out)).eval()
        if quantization == "none":
            assert abs(heldout_loss(plain, data.heldout, 16, tok.pad_token_id).loss
                       - after) < 1e-5


@pytest.mark.parametrize("method", OTHERS)
def test_fed_llama_train_eval_generate_with_each_method(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path, method: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(qa_records(24))
    config = tmp_path / "site.toml"
    config.write_text(f'[backbone]\nname = "{tiny_backbone}"\n[data]\nsource = "{data.name}"\n'
                      f'[adapter]\nmethod = "{method}"\n'
                      "[train]\nmax_steps = 2\nwarmup_steps = 1\n")
    out, metrics = tmp_path / "adapter", tmp_path / "m.json"
    assert main(["-q", "train", str(config), "--out", str(out), "--metrics", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["trainable_parameters"] > 0
    result = tmp_path / "eval.json"
    assert main(["-q", "eval", "--adapter", str(out), "--data", str(data), "--questions", "2",
                 "--json", str(result)]) == 0
    assert json.loads(result.read_text())["examples"] == 24
    assert main(["-q", "generate", "--adapter", str(out), "What does code I10 describe?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def _federation(tmp_path: Path, backbone: Path, write_jsonl, method: str,  # type: ignore[no-untyped-def]
                quantization: str = "none") -> Path:
    """A 3-site, 1-round scenario of ``method`` (its section left at the defaults: the tiny
    model's 2 layers all get the method)."""
    for i in range(3):
        write_jsonl(qa_records(16 + 4 * i), name=f"site{i}.jsonl")
    path = tmp_path / f"{method}.toml"
    path.write_text(f'[backbone]\nname = "{backbone}"\nquantization = "{quantization}"\n'
                    f'[adapter]\nmethod = "{method}"\n'
                    "[train]\nmax_steps = 3\nwarmup_steps = 1\nbatch_size = 4\nlr = 0.05\n"
                    "[evaluation]\nquestions = 2\n"
                    '[federation]\nrounds = 1\nsites = ["site0.jsonl", "site1.jsonl", '
                    '"site2.jsonl"]\n')
    return path


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "rounds" / "round-001" / "adapter_model.safetensors")


@pytest.mark.parametrize(("method", "quantization"), [
    *((m, "none") for m in OTHERS), ("llama-adapter-v2", "nf4")])
def test_a_three_site_federation_of_each_method_and_its_checkpoint_reloads(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path, method: str,
        quantization: str) -> None:
    from fed_llama.inference.model import load_model
    from fed_llama.launch.simulate import simulate

    scenario = _federation(tmp_path, tiny_backbone, write_jsonl, method, quantization)
    out = tmp_path / "run"
    assert main(["-q", "simulate", str(scenario), "--out", str(out)]) == 0
    [row] = json.loads((out / "history.json").read_text())
    assert row["sites-trained"] == 3 and row["sites-evaluated"] == 3
    assert row["sites-refused"] == 0 and row["pooled-perplexity"] > 0
    checkpoint = out / "rounds" / "round-001"
    manifest = read_manifest(checkpoint)
    assert manifest["method"] == method and manifest["adapter"]["method"] == method
    assert manifest["adapter"]["settings"] == build_config(
        ScenarioConfig, {"adapter": {"method": method}}, source="t").method_settings()
    assert manifest["backbone"]["quantization"] == quantization
    saved = _weights(out)
    # the checkpoint loads as `fed-llama eval/generate` load it, to the very tensors saved
    loaded = load_model(None, checkpoint)
    if method == "llama-adapter":
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(loaded.model)
    else:
        state = {k: v for k, v in loaded.model.named_parameters() if k in saved}
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k].detach(), saved[k]) for k in saved)
    gates = [v for k, v in saved.items() if k.endswith(("adaption_gate", "gate"))]
    assert gates and any(float(g.abs().sum()) > 0 for g in gates)  # the sites trained them
    if method == "llama-adapter":  # a plain peft folder
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_backbone)),
                                  str(checkpoint))

    # the run cannot go on as another method: refused before any work, in one line
    with pytest.raises(ConfigError, match=f"the run in .* trains {method}, the scenario q?lora: "
                       "a checkpoint of one adapter method cannot continue as another"):
        simulate(scenario, out, resume=True, overrides=["adapter.method=lora"])
    assert [r["round"] for r in json.loads((out / "history.json").read_text())] == [1]


def test_the_secure_aggregate_of_a_method_is_its_plain_mean(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:
    from fed_llama.launch.simulate import simulate

    plain_settings = ["security.envelopes=false", "security.seal_rounds=false",
                      "evaluation.questions=0"]
    secagg = [*plain_settings, "secure_aggregation.enabled=true",
              "secure_aggregation.max_weight=100"]
    scenario = _federation(tmp_path, tiny_backbone, write_jsonl, "llama-adapter-v2")
    secure = simulate(scenario, tmp_path / "secure", overrides=secagg)
    plain = simulate(scenario, tmp_path / "plain", overrides=plain_settings)
    a, b = _weights(secure.out), _weights(plain.out)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < diff < 1e-4  # masked and quantized (see test_secure_aggregation.py), same mean
    [row] = secure.history()
    assert row["sites-trained"] == 3
    assert read_manifest(secure.out / "rounds" / "round-001")["secure_aggregation"] is True


@pytest.mark.parametrize(("method", "settings"), [
    # not fedadam/fedyogi/fedadagrad: Flower's makes the global adapter float64 after round 1
    # and round 2's float32 updates are refused (wrong-dtype), LoRA's too (server/strategy.py)
    ("llama-adapter", ["federation.strategy=fedavgm", "federation.robust=median",
                       "federation.local_optimizer=keep"]),
    ("excitor", ["privacy.noise_multiplier=0.5", "privacy.clip_norm=0.5"]),
])
def test_strategies_robust_modes_and_privacy_apply_to_the_methods_tensors(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path, method: str,
        settings: list[str]) -> None:
    from fed_llama.launch.simulate import simulate

    scenario = _federation(tmp_path, tiny_backbone, write_jsonl, method)
    store = simulate(scenario, tmp_path / "run",
                     overrides=[*settings, "evaluation.questions=0", "federation.rounds=2"])
    rows = store.history()
    assert [r["sites-trained"] for r in rows] == [3, 3]
    assert all(r["sites-refused"] == 0 for r in rows)
    if method == "excitor":
        assert rows[-1]["dp-epsilon"] > 0
    weights = _weights(store.out)
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())
