"""Edge export: merge maths, ONNX with a KV cache, verification, the torch-free runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from conftest import qa_records, run_without_torch

from fed_llama.adapter import save_adapter
from fed_llama.backbone.load import load_backbone
from fed_llama.config.export import ExportConfig, VerifyConfig
from fed_llama.config.loader import build_config, load_config
from fed_llama.config.train import BackboneConfig, LoraConfig
from fed_llama.errors import AdapterError, ConfigError
from fed_llama.export.build import ExportError
from fed_llama.export.merge import merge_adapter
from fed_llama.export.pipeline import EXPORT_MANIFEST, export_adapter
from fed_llama.export.runtime import (
    ArrayDecoding,
    EdgeRuntimeError,
    InPlaceDecoding,
    OnnxCausalLM,
    render_chat,
    sample_next,
)
from fed_llama.training.lora import attach_lora

pytest.importorskip("onnxruntime_genai")
ROOT = Path(__file__).resolve().parents[1]


def _trained_like_adapter(backbone: Path, out: Path,
                          quantization: Literal["none", "nf4"] = "none",
                          seed: int = 1) -> Path:
    """A LoRA adapter with non-zero B (as after training), saved with a manifest."""
    bb = load_backbone(BackboneConfig(name=str(backbone), quantization=quantization))
    model = attach_lora(bb.model, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return save_adapter(model, out, {"backbone": bb.describe(), "method": "lora"})


@pytest.fixture(scope="module")
def adapter(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _trained_like_adapter(tiny_backbone, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture(scope="module")
def verify_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_records(6)))
    return path


def _cfg(verify_data: Path, **kw: Any) -> ExportConfig:
    verify: dict[str, Any] = {"data": [str(verify_data)], "records": 4, "questions": 1,
                              "max_new_tokens": 4,
              "prefill_tokens": 16, "decode_tokens": 4}
    verify.update(kw.pop("verify", {}))
    return build_config(ExportConfig, {"verify": verify, **kw}, source="test")


@pytest.fixture(scope="module")
def fp32_export(adapter: Path, verify_data: Path, tiny_backbone: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "fp32"
    export_adapter(adapter, out, _cfg(verify_data, quant="fp32"), backbone=str(tiny_backbone))
    return out


def test_merge_is_w_plus_scale_b_a_and_merging_twice_adds_once(adapter: Path,
                                                                tiny_backbone: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    base = load_backbone(BackboneConfig(name=str(tiny_backbone))).model
    w = base.model.layers[1].self_attn.q_proj.weight.detach().clone()
    lora = load_file(adapter / "adapter_model.safetensors")
    a = lora["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = lora["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    expected = w + (8 / 4) * b @ a

    merged = merge_adapter(adapter, str(tiny_backbone))
    got = merged.model.model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert merged.merged_into == "fp32"

    wrapped = PeftModel.from_pretrained(
        load_backbone(BackboneConfig(name=str(tiny_backbone))).model, str(adapter))
    wrapped.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):  # peft says so, and adds nothing
        wrapped.merge_adapter()  # a second merge must not add B·A again
    model: Any = wrapped.base_model.model
    layer = model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)


def test_merged_and_unmerged_logits_agree(adapter: Path, tiny_backbone: Path) -> None:
    from fed_llama.adapter import load_adapter

    ids = torch.tensor([[5, 17, 33, 99, 120, 7]])
    unmerged = load_adapter(load_backbone(BackboneConfig(name=str(tiny_backbone))).model,
                            adapter).eval()
    merged = merge_adapter(adapter, str(tiny_backbone)).model
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits,
                                   rtol=0, atol=1e-5)


def test_a_qlora_adapter_merges_into_the_dequantized_nf4_weights(
        tiny_backbone: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    adapter = _trained_like_adapter(tiny_backbone, tmp_path / "q", quantization="nf4")
    nf4 = load_backbone(BackboneConfig(name=str(tiny_backbone), quantization="nf4")).model
    q = nf4.model.layers[0].self_attn.v_proj.weight
    w = bnbf.dequantize_4bit(q.data, q.quant_state).float()
    lora = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.v_proj"
    expected = w + 2 * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]

    merged = merge_adapter(adapter, str(tiny_backbone))
    assert merged.merged_into == "dequantized-nf4"
    torch.testing.assert_close(merged.model.model.layers[0].self_attn.v_proj.weight,
                               expected, rtol=0, atol=1e-5)
    full = load_backbone(BackboneConfig(name=str(tiny_backbone))).model
    assert not torch.allclose(full.model.layers[0].self_attn.v_proj.weight, w)


def test_onnx_fp32_logits_match_pytorch_with_and_without_the_kv_cache(
        fp32_export: Path, adapter: Path, tiny_backbone: Path) -> None:
    lm = OnnxCausalLM(fp32_export)
    ids = [5, 17, 33, 99, 120, 7, 250, 11]
    with torch.no_grad():
        ref = merge_adapter(adapter, str(tiny_backbone)).model(torch.tensor([ids])).logits[0]
    np.testing.assert_allclose(lm.sequence_logits(ids), ref.numpy(), atol=1e-4)

    logits, cache = lm.forward(ids[:5], lm.empty_cache())  # prefill, then one token at a time
    steps = [logits]
    for token in ids[5:]:
        logits, cache = lm.forward([token], cache)
        steps.append(logits)
    assert cache[0].shape[2] == len(ids)
    np.testing.assert_allclose(np.concatenate(steps), ref.numpy(), atol=1e-4)


def test_the_builder_graph_decodes_in_place_with_the_same_logits(
        fp32_export: Path, adapter: Path, tiny_backbone: Path) -> None:
    """GroupQueryAttention writes each step into one preallocated buffer per cache tensor
    (bound as past and present): the logits equal PyTorch's, step by step."""
    lm = OnnxCausalLM(fp32_export)
    ids = [5, 17, 33, 99, 120, 7, 250, 11]
    with torch.no_grad():
        ref = merge_adapter(adapter, str(tiny_backbone)).model(torch.tensor([ids])).logits[0]
    decoding = lm.decoding(capacity=len(ids))
    assert isinstance(decoding, InPlaceDecoding)
    steps = [decoding.step(ids[:5])] + [decoding.step([token]) for token in ids[5:]]
    assert decoding.length == len(ids)
    np.testing.assert_allclose(np.concatenate(steps), ref.numpy(), atol=1e-4)
    with pytest.raises(EdgeRuntimeError, match="exceed this decoding's capacity of 8"):
        decoding.step([3])


def test_the_plain_torch_route_matches_pytorch_and_the_builder_graph(
        adapter: Path, verify_data: Path, tiny_backbone: Path, fp32_export: Path,
        tmp_path: Path) -> None:
    manifest = export_adapter(adapter, tmp_path / "plain", _cfg(verify_data, quant="fp32",
                                                                 exporter="torch"),
                              backbone=str(tiny_backbone))
    assert manifest["quantization"]["exporter"] == "torch.onnx.export"
    assert manifest["verification"]["pooled"]["max-logit-diff"] < 1e-3
    plain, builder = OnnxCausalLM(tmp_path / "plain"), OnnxCausalLM(fp32_export)
    ids = [5, 17, 33, 99, 120, 7, 250, 11]
    with torch.no_grad():
        ref = merge_adapter(adapter, str(tiny_backbone)).model(torch.tensor([ids])).logits[0]
    decoding = plain.decoding(capacity=len(ids))  # the same runtime runs it, feeding the
    assert isinstance(decoding, ArrayDecoding)    # concatenated cache back each step
    steps = [decoding.step(ids[:5])] + [decoding.step([token]) for token in ids[5:]]
    np.testing.assert_allclose(np.concatenate(steps), ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(plain.sequence_logits(ids), builder.sequence_logits(ids),
                               atol=1e-4)


def test_gate_and_up_are_one_matmul_unless_an_adapter_branch_keeps_them_apart(
        fp32_export: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    import onnx

    from fed_llama.export.build import builder_options

    graph = onnx.load(str(fp32_export / "model.onnx"), load_external_data=False).graph
    matmuls = {n.name for n in graph.node if n.op_type == "MatMul"}
    assert "/model/layers.0/mlp/gate_up_proj/MatMul" in matmuls  # fused (and the logits
    assert "/model/layers.0/mlp/gate_proj/MatMul" not in matmuls  # tests above still hold)

    def lora(spec: LoraConfig, out: Path) -> Path:
        bb = load_backbone(BackboneConfig(name=str(tiny_backbone)))  # peft edits it in place
        return save_adapter(attach_lora(bb.model, spec, seed=0), out, {"backbone": bb.describe()})

    mlp = lora(LoraConfig(r=2, include_mlp=True), tmp_path / "mlp")
    attention = lora(LoraConfig(r=2), tmp_path / "attn")
    cfg = ExportConfig()
    assert "fuse_mlp_gate_up=true" in builder_options(cfg, attention)
    # a runtime LoRA branch on gate or up needs the projection on its own
    assert "fuse_mlp_gate_up=true" not in builder_options(cfg, mlp)


def test_the_export_folder_holds_a_verified_manifest(fp32_export: Path, adapter: Path) -> None:
    manifest = json.loads((fp32_export / EXPORT_MANIFEST).read_text())
    pooled = manifest["verification"]["pooled"]
    assert pooled["perplexity-onnx"] == pytest.approx(pooled["perplexity-pytorch"], rel=1e-4)
    assert pooled["top1-agreement"] == 1.0 and pooled["max-logit-diff"] < 1e-3
    assert manifest["merged_into"] == "fp32" and manifest["quant"] == "fp32"
    assert manifest["source_adapter"]["files"]["adapter_model.safetensors"] == json.loads(
        (adapter / "fed_llama_manifest.json").read_text())["files"]["adapter_model.safetensors"]
    speed = manifest["verification"]["speed-onnx"]
    assert speed["prefill-ms"] > 0 and speed["decode-tokens-per-s"] > 0
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json"):
        assert manifest["files"][name]
    source = next(iter(manifest["verification"]["sources"].values()))
    assert source["tasks-onnx"]["answer/n"] == source["tasks-pytorch"]["answer/n"] == 1


def test_int8_export_is_smaller_and_close(adapter: Path, verify_data: Path, tiny_backbone: Path,
                                          fp32_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    manifest = export_adapter(adapter, out, _cfg(verify_data, quant="int8", block_size=32),
                              backbone=str(tiny_backbone))
    fp32 = json.loads((fp32_export / EXPORT_MANIFEST).read_text())
    assert manifest["size_mb"]["model"] < fp32["size_mb"]["model"]
    pooled = manifest["verification"]["pooled"]
    assert pooled["perplexity-onnx"] <= pooled["perplexity-pytorch"] * 1.02
    # the tied embedding is read from the LM head's 8-bit weights: no fp32 table is left
    assert manifest["quantization"]["embedding"] == "int8-shared"
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert "model.embed_tokens.weight" not in {t.name for t in graph.initializer}
    assert [n.op_type for n in graph.node if "embed_tokens" in n.name] == [
        "Reshape", "GatherBlockQuantized"]


def test_the_int8_embedding_shares_the_head_only_when_it_is_the_same_matrix(
        tiny_backbone: Path, tmp_path: Path) -> None:
    import shutil

    import onnx
    from onnx import numpy_helper

    from fed_llama.export.build import build_onnx
    from fed_llama.export.embedding import share_tied_embedding

    built = tmp_path / "built"
    build_onnx(tiny_backbone, built, ExportConfig(quant="int8"), cache=tmp_path / "cache")
    shared, untied = tmp_path / "shared", tmp_path / "untied"
    shutil.copytree(built, shared)
    shutil.copytree(built, untied)
    ids = [5, 17, 33, 99, 120, 7]
    before = OnnxCausalLM(built).sequence_logits(ids)
    assert share_tied_embedding(shared / "model.onnx")["embedding"] == "int8-shared"
    after = OnnxCausalLM(shared).sequence_logits(ids)
    # only the embedding's 8-bit rounding differs: far below the logits' spread
    assert np.abs(after - before).max() < 0.02 * np.abs(before).max()
    assert (shared / "model.onnx.data").stat().st_size < (built / "model.onnx.data").stat().st_size

    model = onnx.load(str(untied / "model.onnx"))
    table = next(t for t in model.graph.initializer if t.name == "model.embed_tokens.weight")
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table) + 0.1, table.name))
    (untied / "model.onnx.data").unlink()
    onnx.save_model(model, str(untied / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data")
    report = share_tied_embedding(untied / "model.onnx")
    assert report == {"embedding": "fp32", "reason": "the embedding is not tied to the LM head"}


def test_a_gptq_int4_export_is_calibrated_on_records_verification_does_not_use(
        adapter: Path, verify_data: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    cfg = _cfg(verify_data, quant="int4", algorithm="gptq", calibration_records=8,
               verify={"max_perplexity_increase": 10.0})
    manifest = export_adapter(adapter, tmp_path / "gptq", cfg, backbone=str(tiny_backbone))
    q = manifest["quantization"]
    assert q["algorithm"] == "gptq"
    assert q["matrices"] == 2 * 4  # qkv, o, gate+up (one fused matrix), down of both layers
    assert q["calibration_records"] == 6 - 4  # the file's records outside verification
    # what GPTQ minimizes, the layers' output error on the calibration data, went down
    assert q["output_error_gptq"] < q["output_error_builder"]

    every_record = _cfg(verify_data, quant="int4", algorithm="gptq", verify={"records": 6})
    with pytest.raises(ConfigError, match="none is left to calibrate"):
        export_adapter(adapter, tmp_path / "none-left", every_record, backbone=str(tiny_backbone))
    assert not (tmp_path / "none-left").exists()


def test_failed_verification_writes_nothing(adapter: Path, verify_data: Path,
                                            tiny_backbone: Path, tmp_path: Path) -> None:
    cfg = _cfg(verify_data, quant="int4", verify={"max_perplexity_increase": 0.0,
                                                  "min_top1_agreement": 1.0})
    with pytest.raises(ExportError, match=r"export refused, nothing written.*top-1 agreement"):
        export_adapter(adapter, tmp_path / "int4", cfg, backbone=str(tiny_backbone))
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder


def test_bad_adapters_and_outputs_are_refused_before_any_work(
        adapter: Path, verify_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(verify_data, quant="fp32")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match=r"already exists.*--force"):
        export_adapter(adapter, taken, cfg)
    assert (taken / "keep.txt").read_text() == "mine"

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in adapter.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x01\x02\x03")
    with pytest.raises(AdapterError, match="does not match the sha256"):
        export_adapter(broken, tmp_path / "out", cfg)
    with pytest.raises(ConfigError, match="unknown ICD-10 site"):
        export_adapter(adapter, tmp_path / "out",
                       build_config(ExportConfig, {"verify": {"data": ["icd10:nowhere"]}},
                                    source="test"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken"]


def test_profiles_are_checked_up_front() -> None:
    with pytest.raises(ConfigError) as err:
        build_config(ExportConfig, {"quant": "int8", "mixed_precision": ["last_matmul"],
                                    "block_size": 48, "colour": "red"}, source="p.toml")
    text = str(err.value)
    assert "3 problems" in text and "block_size" in text and "unknown key colour" in text
    assert "only applies to quant = 'int4'" in text
    with pytest.raises(ConfigError, match="exporter = 'torch' quantizes with onnxruntime"):
        build_config(ExportConfig, {"exporter": "torch", "quant": "int8", "algorithm": "rtn"},
                     source="p.toml")
    for profile in sorted((ROOT / "edge_export" / "profiles").glob("*.toml")):
        assert isinstance(load_config(ExportConfig, profile), ExportConfig)
    assert ExportConfig(quant="int4").perplexity_bound() == 0.15
    assert ExportConfig(verify=VerifyConfig(max_perplexity_increase=0.05)).perplexity_bound() \
        == 0.05


def test_sampling_greedy_top_p_and_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.05, 0.6, 0.3, 0.05]))
    assert sample_next(logits, 0.0, 1.0, rng) == 1
    assert {sample_next(logits, 1.0, 0.5, rng) for _ in range(50)} == {1}  # nucleus = {1}
    assert {sample_next(logits, 1.0, 0.8, rng) for _ in range(200)} == {1, 2}
    draws = [sample_next(logits, 1.0, 1.0, rng) for _ in range(4000)]
    assert np.bincount(draws, minlength=4)[1] / 4000 == pytest.approx(0.6, abs=0.03)


def test_the_chat_template_renders_as_transformers_does(tiny_backbone: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_backbone))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(tok.chat_template, messages) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_onnx_generate_never_imports_torch(fp32_export: Path) -> None:
    proc = run_without_torch('generate', '--onnx', str(fp32_export), 'hello',
                             '--max-new-tokens', '6', '--temperature', '0.7', '--top-p', '0.9')
    assert proc.returncode == 0, proc.stderr
    assert "blocked" not in proc.stderr
    assert proc.stdout.endswith("\n")


def test_onnx_generate_refuses_a_folder_that_is_not_an_export(tmp_path: Path) -> None:
    from fed_llama.cli.main import main

    assert main(["generate", "--onnx", str(tmp_path), "hi"]) == 2
    assert main(["generate", "--onnx", str(tmp_path / "nope"), "hi"]) == 2


def test_runtime_adapters_switch_per_site_without_re_export(
        adapter: Path, verify_data: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    from fed_llama.export.switchable import add_adapter

    out = tmp_path / "switch"
    manifest = export_adapter(adapter, out, _cfg(verify_data, quant="fp32",
                                                 runtime_adapters=True),
                              backbone=str(tiny_backbone))
    assert manifest["runtime_adapters"]["adapters"] == ["a"]  # the export's own, built in
    other = _trained_like_adapter(tiny_backbone, tmp_path / "other", seed=7)
    add_adapter(other, out, "site-2")
    assert "adapters/site-2.onnx_adapter" in json.loads(
        (out / EXPORT_MANIFEST).read_text())["files"]

    ids = [5, 17, 33, 99, 120, 7]
    for name, path in ((None, adapter), ("a", adapter), ("site-2", other)):
        with torch.no_grad():
            ref = merge_adapter(path, str(tiny_backbone)).model(torch.tensor([ids])).logits[0]
        lm = OnnxCausalLM(out, adapter=name)
        np.testing.assert_allclose(lm.sequence_logits(ids), ref.numpy(), atol=1e-4,
                                   err_msg=str(name))
        decoding = lm.decoding(len(ids))  # generation's path: the adapter applies there too
        steps = [decoding.step(ids[:3])] + [decoding.step([token]) for token in ids[3:]]
        np.testing.assert_allclose(np.concatenate(steps), ref.numpy(), atol=1e-4,
                                   err_msg=str(name))

    bb = load_backbone(BackboneConfig(name=str(tiny_backbone)))
    rank2 = save_adapter(attach_lora(bb.model, LoraConfig(r=2), seed=0), tmp_path / "r2",
                         {"backbone": bb.describe()})
    with pytest.raises(AdapterError, match=r"does not fit this export.*shape \[64, 2\]"):
        add_adapter(rank2, out, "r2")
    with pytest.raises(EdgeRuntimeError, match=r"no such runtime adapter.*has: a, site-2"):
        OnnxCausalLM(out, adapter="nowhere")


# --- The survey's other adapters ---------------------------------------------------------

def _method_adapter(backbone: Path, out: Path, method: str, **settings: Any) -> Path:
    """A fed-llama method's adapter, moved away from its initialization, saved as trained."""
    from fed_llama.adapter.methods import method_of
    from fed_llama.adapter.methods.own_format import save

    bb = load_backbone(BackboneConfig(name=str(backbone)))
    spec = method_of(method)
    cfg = spec.config_type(**settings)
    model = spec.attach(bb.model, cfg, 0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    if spec.peft_native:
        return save_adapter(model, out, {"backbone": bb.describe(), "method": method})
    return save(model, method, cfg, out, {"backbone": bb.describe(), "method": method})


def test_a_v2_adapter_without_prompts_folds_into_a_llama_with_biases(
        tiny_backbone: Path, tmp_path: Path) -> None:
    from fed_llama.adapter.methods.own_format import load_into

    adapter = _method_adapter(tiny_backbone, tmp_path / "v2", "llama-adapter-v2",
                              prompts=False)
    merged = merge_adapter(adapter, str(tiny_backbone))
    assert merged.model.config.attention_bias and merged.model.config.mlp_bias
    assert not [n for n, _ in merged.model.named_parameters() if "adapter_" in n]
    unfolded = load_into(load_backbone(BackboneConfig(name=str(tiny_backbone))).model, adapter)
    ids = torch.tensor([[5, 17, 33, 99, 120, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, unfolded(ids).logits,
                                   rtol=0, atol=1e-5)


def test_a_folded_v2_adapter_exports_and_verifies_against_pytorch(
        tiny_backbone: Path, tmp_path: Path, verify_data: Path) -> None:
    adapter = _method_adapter(tiny_backbone, tmp_path / "v2", "llama-adapter-v2",
                              prompts=False)
    manifest = export_adapter(adapter, tmp_path / "out", _cfg(verify_data, quant="fp32"),
                              backbone=str(tiny_backbone))
    report = manifest["verification"]
    assert manifest["source_adapter"]["method"] == "llama-adapter-v2"
    assert report["pooled"]["max-logit-diff"] < 1e-3, report["pooled"]
    assert report["pooled"]["top1-agreement"] == 1.0


@pytest.mark.parametrize("settings", [{"prompt_layers": 2}, {"prompts": False}])
def test_runtime_switching_of_v2_is_refused_before_any_work(
        tiny_backbone: Path, tmp_path: Path, verify_data: Path, settings: dict[str, Any]
        ) -> None:
    """V2 folds its biases and scales into the projection weights, which differ per site; V1
    and Excitor switch (test_export_methods.py), as LoRA does."""
    adapter = _method_adapter(tiny_backbone, tmp_path / "a", "llama-adapter-v2", **settings)
    with pytest.raises(ConfigError, match=r"is a llama-adapter-v2 adapter: runtime_adapters "
                                          r"switches lora, llama-adapter and excitor adapters "
                                          r"\(V2 folds its biases"):
        export_adapter(adapter, tmp_path / "out", _cfg(verify_data, quant="fp32",
                                                       runtime_adapters=True),
                       backbone=str(tiny_backbone))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
