"""Edge export of the adapter methods that do not fold (V1, V2 with prompts, Excitor): the
plain torch.onnx route traces their branches; the builder route grafts them onto its graph as
constants around GroupQueryAttention. Both give PyTorch's logits, with and without the KV
cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import qa_records, run_without_torch

from fed_llama.adapter import save_adapter
from fed_llama.backbone.load import load_backbone
from fed_llama.config.export import ExportConfig
from fed_llama.config.loader import build_config
from fed_llama.config.train import BackboneConfig
from fed_llama.errors import ConfigError
from fed_llama.export.merge import merge_adapter
from fed_llama.export.pipeline import EXPORT_MANIFEST, export_adapter
from fed_llama.export.runtime import ArrayDecoding, InPlaceDecoding, OnnxCausalLM

pytest.importorskip("onnxruntime_genai")

METHODS = {
    "llama-adapter": ({"layers": 2, "prompt_length": 3}, "gated adaption prompts"),
    "llama-adapter-v2": ({"prompt_layers": 2, "prompt_length": 3}, "gated adaption prompts"),
    "excitor": ({"layers": 2, "rank": 4, "prompt_length": 3}, "an extra-key branch"),
}
IDS = [5, 17, 33, 99, 120, 7, 250, 11, 42, 3]
GATE = 0.8


def _trained_like(backbone: Path, out: Path, method: str, seed: int = 3) -> Path:
    """A ``method`` adapter moved off its initialization (by ``seed``), every gate at ``GATE``
    (so the branch changes the logits), saved as training saves it."""
    from fed_llama.adapter.methods import method_of
    from fed_llama.adapter.methods.own_format import save

    bb = load_backbone(BackboneConfig(name=str(backbone)))
    spec = method_of(method)
    cfg = spec.config_type(**METHODS[method][0])
    model = spec.attach(bb.model, cfg, 0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            if name.endswith(("adaption_gate", "key_branch.gate")):
                p.fill_(GATE)
            if name.endswith("key_branch.prompt"):  # std 0.02 at init: extra keys ~1e-4
                p.copy_(torch.randn(p.shape, generator=gen))
    manifest = {"backbone": bb.describe(), "method": method}
    if spec.peft_native:
        return save_adapter(model, out, manifest)
    return save(model, method, cfg, out, manifest)


@pytest.fixture(scope="module")
def verify_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_records(6)))
    return path


def _cfg(verify_data: Path, **kw: Any) -> ExportConfig:
    verify: dict[str, Any] = {"data": [str(verify_data)], "records": 4, "questions": 1,
                              "max_new_tokens": 4, "prefill_tokens": 16, "decode_tokens": 4}
    verify.update(kw.pop("verify", {}))
    return build_config(ExportConfig, {"verify": verify, **kw}, source="test")


@pytest.fixture(scope="module", params=[(m, e) for m in METHODS for e in ("torch", "builder")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def method_export(request: pytest.FixtureRequest, tiny_backbone: Path, verify_data: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    method, exporter = request.param
    root = tmp_path_factory.mktemp(method)
    adapter = _trained_like(tiny_backbone, root / "adapter", method)
    out = root / "fp32"
    export_adapter(adapter, out, _cfg(verify_data, quant="fp32", exporter=exporter),
                   backbone=str(tiny_backbone))
    return method, adapter, out


def _reference(adapter: Path, backbone: Path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        model = merge_adapter(adapter, str(backbone)).model
        return model(torch.tensor([ids])).logits[0].numpy()


def test_the_onnx_graph_carries_the_branch_with_and_without_the_kv_cache(
        method_export: tuple[str, Path, Path], tiny_backbone: Path) -> None:
    _, adapter, out = method_export
    ref = _reference(adapter, tiny_backbone, IDS)
    with torch.no_grad():
        plain = load_backbone(BackboneConfig(name=str(tiny_backbone))).model
        base = plain(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(ref - base).max() > 1e-2  # the branch matters: a graph without it fails

    lm = OnnxCausalLM(out)
    np.testing.assert_allclose(lm.sequence_logits(IDS), ref, atol=1e-4)
    decoding = lm.decoding(len(IDS))  # a prompt, then cached decode steps one token each
    # the builder's graph keeps its cache in place (GroupQueryAttention writes each step into
    # one buffer); the plain graph's cache is fed back as arrays
    builder = json.loads((out / EXPORT_MANIFEST).read_text())["profile"]["exporter"] == "builder"
    assert isinstance(decoding, InPlaceDecoding if builder else ArrayDecoding)
    steps = [decoding.step(IDS[:4])] + [decoding.step([token]) for token in IDS[4:]]
    np.testing.assert_allclose(np.concatenate(steps), ref, atol=1e-4)


def test_the_manifest_records_the_method_the_branch_and_the_gate_passed(
        method_export: tuple[str, Path, Path]) -> None:
    method, _, out = method_export
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert manifest["method"] == method
    assert manifest["adapter_branches"] == METHODS[method][1]
    builder = manifest["profile"]["exporter"] == "builder"
    if builder:  # both layers carry the method's branch
        assert manifest["quantization"]["grafted"] == (
            {"prompts": 0, "keys": 2} if method == "excitor" else {"prompts": 2, "keys": 0})
    else:
        assert manifest["quantization"]["exporter"] == "torch.onnx.export"
    pooled = manifest["verification"]["pooled"]
    assert pooled["top1-agreement"] == 1.0 and pooled["max-logit-diff"] < 1e-4
    genai = manifest["runtime"]["onnxruntime-genai"]
    readme = (out / "README.md").read_text()
    how = "grafted onto the builder's graph" if builder else "traced into the graph"
    assert f"method {method}, its {METHODS[method][1]} {how}" in readme
    assert ("Or plain onnxruntime-genai" in readme) == bool(genai["loads"])


def test_generate_onnx_gives_pytorchs_greedy_tokens_without_torch(
        method_export: tuple[str, Path, Path], tiny_backbone: Path, tmp_path: Path) -> None:
    """On a device: only the files the folder's README lists, copied, without torch; and with
    plain onnxruntime-genai."""
    import shutil

    from fed_llama.export.folder import README, readme_files

    _, adapter, exported = method_export
    out = tmp_path / "device"
    for name in readme_files((exported / README).read_text()):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(exported / name, out / name)
    lm = OnnxCausalLM(out)
    prompt = lm.encode_chat([{"role": "user", "content": "hello"}])
    model = merge_adapter(adapter, str(tiny_backbone)).model
    expected: list[int] = []
    with torch.no_grad():  # greedy, full forward each step (no cache)
        for _ in range(8):
            token = int(model(torch.tensor([prompt + expected])).logits[0, -1].argmax())
            if token in lm.spec.eos_ids:
                break
            expected.append(token)
    assert list(lm.generate_ids(prompt, max_new_tokens=8)) == expected

    proc = run_without_torch('generate', '--onnx', str(out), 'hello', '--max-new-tokens', '8')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == lm.tokenizer.decode(expected, skip_special_tokens=True).strip()

    import onnxruntime_genai as og

    model_og = og.Model(str(out))
    params = og.GeneratorParams(model_og)
    params.set_search_options(max_length=len(prompt) + len(expected) + 1, do_sample=False)
    generator = og.Generator(model_og, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0))[len(prompt):][:len(expected)] == expected


@pytest.mark.parametrize("method", list(METHODS))
def test_int8_of_the_plain_route_passes_the_int8_profiles_gate(
        method: str, tiny_backbone: Path, verify_data: Path, tmp_path: Path) -> None:
    adapter = _trained_like(tiny_backbone, tmp_path / "adapter", method)
    # the test model's logits are nearly flat (perplexity ~400 over its small vocabulary), so
    # its top-1 agreement counts near-ties: 0.92 for V2 here at a largest logit change of 0.006
    cfg = _cfg(verify_data, quant="int8", exporter="torch", block_size=32,
               verify={"min_top1_agreement": 0.9})
    manifest = export_adapter(adapter, tmp_path / "int8", cfg, backbone=str(tiny_backbone))
    q = manifest["quantization"]
    assert q["bits"] == 8 and q["matrices"] == 2 * 7 + 1  # 7 projections x 2 layers + LM head
    assert q["fp32-branch-matmuls"] == (2 * 6 if method == "excitor" else 0)  # 6 per block
    # the prompts' second pass through k_proj and v_proj (and V1's o_proj on the branch)
    # reads the token path's 8-bit blocks: no fp32 copy of a projection is left in the file
    assert q["shared-weight-matmuls"] == {"llama-adapter": 2 * 3, "llama-adapter-v2": 2 * 2,
                                          "excitor": 0}[method]
    import onnx

    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    matrices = {t.name for t in graph.initializer if len(t.dims) == 2 and min(t.dims) > 1}
    assert not [n for n in graph.node if n.op_type in ("Identity", "MatMul")
                and n.input[-1] in matrices and "key_branch" not in n.name]
    # the tied embedding is read from the 8-bit LM head's blocks: no fp32 table either
    assert q["embedding"] == "int8-shared"
    assert "GatherBlockQuantized" in {n.op_type for n in graph.node}
    pooled = manifest["verification"]["pooled"]
    assert pooled["top1-agreement"] >= 0.9
    assert pooled["max-logit-diff"] < 0.02
    assert pooled["perplexity-onnx"] <= pooled["perplexity-pytorch"] * 1.02
    lm = OnnxCausalLM(tmp_path / "int8")
    ref = _reference(adapter, tiny_backbone, IDS)
    got = lm.sequence_logits(IDS)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # 8-bit rounding, not a lost branch


@pytest.mark.parametrize("method", list(METHODS))
def test_int8_of_the_builder_route_quantizes_the_backbone_and_keeps_the_branch_fp32(
        method: str, tiny_backbone: Path, verify_data: Path, tmp_path: Path) -> None:
    import onnx

    adapter = _trained_like(tiny_backbone, tmp_path / "adapter", method)
    cfg = _cfg(verify_data, quant="int8", block_size=32, verify={"min_top1_agreement": 0.9})
    manifest = export_adapter(adapter, tmp_path / "int8", cfg, backbone=str(tiny_backbone))
    q = manifest["quantization"]
    assert sum(q["grafted"].values()) == 2 and q["embedding"] == "int8-shared"
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    # the builder's fast path stays: fused attention with the cache in place, 8-bit weights
    assert ops.count("GroupQueryAttention") == 2 and "MatMulNBits" in ops
    grafted = [n for n in graph.node if "/graft" in n.name]
    assert grafted and all(n.op_type != "MatMulNBits" for n in grafted)
    assert ("RotaryEmbedding" in {n.op_type for n in grafted}) == (method != "excitor")
    pooled = manifest["verification"]["pooled"]
    assert pooled["top1-agreement"] >= 0.9
    assert pooled["perplexity-onnx"] <= pooled["perplexity-pytorch"] * 1.02
    ref = _reference(adapter, tiny_backbone, IDS)
    got = OnnxCausalLM(tmp_path / "int8").sequence_logits(IDS)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # 8-bit rounding, not a lost branch


def test_the_plain_route_quantizes_round_to_nearest_or_gptq_only() -> None:
    for algorithm in ("k_quant", "rtn"):
        with pytest.raises(ConfigError, match=r"round-to-nearest or GPTQ only.*'default' or "
                                              r"'gptq'"):
            build_config(ExportConfig, {"exporter": "torch", "quant": "int4",
                                        "algorithm": algorithm}, source="p.toml")
    with pytest.raises(ConfigError, match=r"keeps only the LM head in 8-bit"):
        build_config(ExportConfig, {"exporter": "torch", "quant": "int4", "algorithm": "gptq",
                                    "mixed_precision": ["last_matmul", "mixed_layers"]},
                     source="p.toml")
    with pytest.raises(ConfigError, match=r"'gptq' is calibrated int4"):
        build_config(ExportConfig, {"exporter": "torch", "quant": "int8", "algorithm": "gptq"},
                     source="p.toml")
    for quant, algorithm in (("int8", "default"), ("int4", "default"), ("int4", "gptq")):
        cfg = build_config(ExportConfig, {"exporter": "torch", "quant": quant,
                                          "algorithm": algorithm}, source="p.toml")
        assert (cfg.quant, cfg.algorithm) == (quant, algorithm)


@pytest.mark.parametrize("method", list(METHODS))
def test_gptq_int4_of_the_plain_route_calibrates_every_projection_and_beats_rounding(
        method: str, tiny_backbone: Path, verify_data: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    import onnx

    caplog.set_level(logging.INFO)
    adapter = _trained_like(tiny_backbone, tmp_path / "adapter", method)
    cfg = _cfg(verify_data, quant="int4", exporter="torch", algorithm="gptq", block_size=32,
               mixed_precision=["last_matmul"],
               verify={"min_top1_agreement": 0.0, "max_perplexity_increase": 10.0})
    manifest = export_adapter(adapter, tmp_path / "int4", cfg, backbone=str(tiny_backbone))
    q = manifest["quantization"]
    assert q["algorithm"] == "gptq" and q["bits"] == 4 and q["symmetric"] is False
    assert q["lm_head_bits"] == 8
    assert q["matrices"] == 2 * 7 + 1  # 4-bit: 7 projections x 2 layers + LM head
    assert q["calibrated"] == 2 * 7  # GPTQ: every projection; the LM head as rounded
    # GPTQ's layer outputs on the calibration data move less than round-to-nearest's
    assert q["output_error_gptq"] < q["output_error_builder"]
    # onnxruntime's quantizer logs two INFO lines per graph node: not shown
    assert not [r for r in caplog.records if "to quantize" in r.getMessage()]
    assert any("GPTQ: 14 matrices" in r.getMessage() for r in caplog.records)
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    # the branch's second use of k_proj (the prompts, V1 and V2) reads the token path's
    # blocks, so GPTQ's codes reach both uses
    k_nodes = [n for n in graph.graph.node
               if "layers.1/self_attn/" in n.name and "k_proj" in n.name
               and n.op_type.startswith("MatMul")]
    assert {n.op_type for n in k_nodes} == {"MatMulNBits"}
    assert len({tuple(n.input[1:]) for n in k_nodes}) == 1
    assert len(k_nodes) == (1 if method == "excitor" else 2)
    assert q["embedding"] == "int8-shared"  # the lookup reads the 8-bit LM head
    bits = {n.name.split("/")[-2]: onnx.helper.get_attribute_value(a)
            for n in graph.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"}
    assert bits.pop("lm_head") == 8 and set(bits.values()) == {4}
    # the graph holds GPTQ's codes, not its quantizer's rounding of the same weight on the
    # same grid (GPTQ moves codes to absorb the error of the columns before)
    from onnx import numpy_helper

    from fed_llama.export.gptq import decoder_layers, projection, unpack

    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    node = next(n for n in graph.graph.node
                if n.op_type == "MatMulNBits" and "layers.0/self_attn/" in n.name
                and n.name.endswith("q_proj/MatMul_Q4"))
    held = unpack(*(inits[name] for name in node.input[1:4]))
    merged = merge_adapter(adapter, str(tiny_backbone)).model
    w = projection(decoder_layers(merged)[0], "self_attn.q_proj").weight.detach().numpy()
    scale = np.repeat(held.scales, held.block_size, axis=1)
    zero = np.repeat(held.zeros, held.block_size, axis=1).astype(np.float64)
    rounded = np.clip(np.round(w / scale) + zero, 0, 15)
    moved = np.mean(held.codes != rounded)
    assert 0.01 < moved < 0.6  # 0.27 measured; a wrong layout would mismatch ~15/16 codes
    ref = _reference(adapter, tiny_backbone, IDS)
    got = OnnxCausalLM(tmp_path / "int4").sequence_logits(IDS)
    assert np.abs(got - ref).max() < 0.25 * np.abs(ref).max()  # 4-bit rounding, not a lost branch


@pytest.mark.parametrize("method", list(METHODS))
def test_gptq_int4_of_the_builder_route_calibrates_the_backbone_under_the_branches(
        method: str, tiny_backbone: Path, verify_data: Path, tmp_path: Path) -> None:
    """GPTQ's Hessians come from the PyTorch model with its branches (they change the inputs
    of the layers above), its codes replace the builder's k-quant projections, and the
    grafted branch stays fp32 beside them."""
    adapter = _trained_like(tiny_backbone, tmp_path / "adapter", method)
    cfg = _cfg(verify_data, quant="int4", algorithm="gptq", block_size=32,
               mixed_precision=["last_matmul"],
               verify={"min_top1_agreement": 0.0, "max_perplexity_increase": 10.0})
    manifest = export_adapter(adapter, tmp_path / "int4", cfg, backbone=str(tiny_backbone))
    q = manifest["quantization"]
    assert q["algorithm"] == "gptq" and sum(q["grafted"].values()) == 2
    assert q["output_error_gptq"] < q["output_error_builder"]
    ref = _reference(adapter, tiny_backbone, IDS)
    got = OnnxCausalLM(tmp_path / "int4").sequence_logits(IDS)
    assert np.abs(got - ref).max() < 0.25 * np.abs(ref).max()  # 4-bit rounding, not a lost branch


@pytest.mark.parametrize("method", ["llama-adapter", "excitor"])
def test_v1_and_excitor_switch_per_site_at_run_time_without_torch(
        method: str, tiny_backbone: Path, verify_data: Path, tmp_path: Path) -> None:
    """A runtime_adapters export lists the grafted constants among the graph's inputs;
    ``export-adapter`` computes another site's constants from its adapter folder with numpy
    (V1's prompts through the export's own k/v projections) and that site's run gives its
    PyTorch logits, with and without the cache."""
    from fed_llama.errors import AdapterError
    from fed_llama.export.switchable import add_adapter

    adapter = _trained_like(tiny_backbone, tmp_path / "a", method)
    out = tmp_path / "switch"
    manifest = export_adapter(adapter, out, _cfg(verify_data, quant="fp32",
                                                 runtime_adapters=True),
                              backbone=str(tiny_backbone))
    assert manifest["runtime_adapters"]["slots"] == 2 * 2  # two constants x two layers
    assert (out / "adapters" / "prompt_projections.safetensors").is_file() == (
        method == "llama-adapter")
    other = _trained_like(tiny_backbone, tmp_path / "site-2", method, seed=11)
    proc = run_without_torch("export-adapter", "--adapter", str(other), "--onnx", str(out))
    assert proc.returncode == 0, proc.stderr
    for name, path in ((None, adapter), ("a", adapter), ("site-2", other)):
        ref = _reference(path, tiny_backbone, IDS)
        lm = OnnxCausalLM(out, adapter=name)
        np.testing.assert_allclose(lm.sequence_logits(IDS), ref, atol=1e-4, err_msg=str(name))
        decoding = lm.decoding(len(IDS))
        steps = [decoding.step(IDS[:4])] + [decoding.step([token]) for token in IDS[4:]]
        np.testing.assert_allclose(np.concatenate(steps), ref, atol=1e-4, err_msg=str(name))
    assert np.abs(_reference(other, tiny_backbone, IDS)
                  - _reference(adapter, tiny_backbone, IDS)).max() > 1e-2  # sites differ

    wrong = "excitor" if method == "llama-adapter" else "llama-adapter"
    with pytest.raises(AdapterError, match=f"is a {wrong} adapter; this export switches "
                                           f"{method} adapters"):
        add_adapter(_trained_like(tiny_backbone, tmp_path / "wrong", wrong), out, "wrong")
    longer = tmp_path / "longer"  # another prompt length: the slots' shapes differ
    from fed_llama.adapter.methods import method_of

    spec = method_of(method)
    bb = load_backbone(BackboneConfig(name=str(tiny_backbone)))
    cfg = spec.config_type(**{**METHODS[method][0], "prompt_length": 5})
    model = spec.attach(bb.model, cfg, 0)
    if spec.peft_native:
        save_adapter(model, longer, {"backbone": bb.describe(), "method": method})
    else:
        from fed_llama.adapter.methods.own_format import save

        save(model, method, cfg, longer, {"backbone": bb.describe(), "method": method})
    with pytest.raises(AdapterError, match=r"does not fit this export.*shape"):
        add_adapter(longer, out, "longer")


def test_a_graph_not_laid_out_as_the_builders_is_refused_with_its_reason(
        method_export: tuple[str, Path, Path], tiny_backbone: Path, tmp_path: Path) -> None:
    """The graft finds each adapted layer's GroupQueryAttention by the builder's names; on
    another graph (the plain route's, or a builder graph whose attention is laid out
    otherwise) it names what is missing and writes nothing."""
    import shutil

    import onnx

    from fed_llama.export.branches import from_model
    from fed_llama.export.build import ExportError, save_graph
    from fed_llama.export.graft import graft_branches

    _, adapter, out = method_export
    shutil.copytree(out, tmp_path / "copy")
    if json.loads((out / EXPORT_MANIFEST).read_text())["profile"]["exporter"] == "builder":
        graph = onnx.load(str(tmp_path / "copy" / "model.onnx"))
        for node in graph.graph.node:  # another builder version's names, say
            node.name = node.name.replace("GroupQueryAttention", "Attention")
        save_graph(graph, tmp_path / "copy" / "model.onnx")
    before = (tmp_path / "copy" / "model.onnx").read_bytes()
    model = merge_adapter(adapter, str(tiny_backbone)).model
    with pytest.raises(ExportError, match=r"no /model/layers\.0/attn/GroupQueryAttention.*"
                                          r"exporter = 'torch'"):
        graft_branches(tmp_path / "copy" / "model.onnx", from_model(model))
    assert (tmp_path / "copy" / "model.onnx").read_bytes() == before
