"""``data.system_prompt``: the system message an adapter is trained with goes everywhere the
adapter is asked something (its held-out questions, ``fed-llama eval`` and ``generate``, an
export's verification, README and runtime)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import qa_records

from fed_llama.adapter import read_manifest
from fed_llama.config import BackboneConfig, DataConfig, OptimConfig, TrainConfig
from fed_llama.config.train import TEMPLATE_SYSTEM_PROMPT
from fed_llama.data.records import Example
from fed_llama.data.source import load_examples


def _roles(examples: list[Example]) -> set[tuple[str, ...]]:
    return {tuple(m["role"] for m in ex.messages) for ex in examples}


def test_by_default_the_chat_template_adds_its_own_system_message() -> None:
    assert DataConfig().system_prompt == TEMPLATE_SYSTEM_PROMPT
    assert DataConfig().trained_system_prompt is None
    raw = load_examples(DataConfig(source="icd10:cardiology"), seed=0)
    assert _roles(raw.train) == _roles(raw.heldout) == {("user", "assistant")}


@pytest.mark.parametrize("text", ["", "You code diagnoses in ICD-10-CM."])
def test_a_system_prompt_goes_first_in_training_and_held_out_examples(text: str) -> None:
    plain = load_examples(DataConfig(source="icd10:cardiology"), seed=0)
    raw = load_examples(DataConfig(source="icd10:cardiology", system_prompt=text), seed=0)
    assert _roles(raw.train) == _roles(raw.heldout) == {("system", "user", "assistant")}
    assert {ex.messages[0]["content"] for ex in raw.train + raw.heldout} == {text}
    # the same examples otherwise: the same questions, answers and task labels
    assert [ex.messages[1:] for ex in raw.train] == [ex.messages for ex in plain.train]
    assert [ex.meta for ex in raw.heldout] == [ex.meta for ex in plain.heldout]


def test_an_example_with_its_own_system_message_keeps_it(write_jsonl) -> None:  # type: ignore[no-untyped-def]
    own = {"messages": [{"role": "system", "content": "Answer in French."},
                        {"role": "user", "content": "Hello?"},
                        {"role": "assistant", "content": "Bonjour."}]}
    path = write_jsonl([own, *qa_records(9)])
    raw = load_examples(DataConfig(source=str(path), system_prompt="Be brief."), seed=0)
    firsts = [ex.messages[0] for ex in raw.train + raw.heldout]
    assert firsts.count({"role": "system", "content": "Answer in French."}) == 1
    assert firsts.count({"role": "system", "content": "Be brief."}) == 9


def test_the_empty_system_message_saves_the_template_default_on_every_example(
        tiny_backbone: Path) -> None:
    from fed_llama.backbone import load_backbone
    from fed_llama.data.source import encode_site

    tok = load_backbone(BackboneConfig(name=str(tiny_backbone))).tokenizer
    cfg = DataConfig(source="icd10:cardiology", max_train_records=50)
    default = encode_site(load_examples(cfg, seed=0), cfg, tok)
    empty_cfg = DataConfig(source="icd10:cardiology", max_train_records=50, system_prompt="")
    empty = encode_site(load_examples(empty_cfg, seed=0), empty_cfg, tok)
    default_text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    empty_text = tok.apply_chat_template([{"role": "system", "content": ""},
                                          {"role": "user", "content": "x"}], tokenize=False)
    saved = len(tok(default_text)["input_ids"]) - len(tok(empty_text)["input_ids"])
    assert saved > 0  # the template's default system message costs tokens
    assert [len(a.input_ids) - len(b.input_ids) for a, b in zip(
        default.train, empty.train, strict=True)] == [saved] * len(default.train)
    # the answers, and so what the loss is taken over, are the same tokens
    assert [[t for t in a.labels if t != -100] for a in default.train] == [
        [t for t in b.labels if t != -100] for b in empty.train]


def test_the_adapter_records_its_system_prompt_and_eval_and_generate_use_it(
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fed_llama.cli.commands import _chat_messages
    from fed_llama.inference.model import load_model
    from fed_llama.training.job import run_training

    path = write_jsonl(qa_records(12))
    base = TrainConfig(backbone=BackboneConfig(name=str(tiny_backbone)),
                       train=OptimConfig(max_steps=1, warmup_steps=0))
    plain = run_training(TrainConfig(backbone=base.backbone, train=base.train,
                                     data=DataConfig(source=str(path))),
                         tmp_path / "plain", progress=False)
    assert plain and read_manifest(tmp_path / "plain")["system_prompt"] is None
    run_training(TrainConfig(backbone=base.backbone, train=base.train,
                             data=DataConfig(source=str(path), system_prompt="Be brief.")),
                 tmp_path / "brief", progress=False)
    assert read_manifest(tmp_path / "brief")["system_prompt"] == "Be brief."
    loaded = load_model(None, tmp_path / "brief")
    assert loaded.system_prompt == "Be brief."
    assert load_model(None, tmp_path / "plain").system_prompt is None

    def asked(system: str | None, trained: str | None) -> list[dict[str, str]]:
        return _chat_messages(argparse.Namespace(system=system, prompt="Hi?"), trained)

    assert asked(None, "Be brief.")[0] == {"role": "system", "content": "Be brief."}
    assert asked("", "Be brief.")[0] == {"role": "system", "content": ""}  # --system wins
    assert asked(None, None) == [{"role": "user", "content": "Hi?"}]


def test_a_manifest_whose_system_prompt_is_no_text_is_refused(tmp_path: Path) -> None:
    from fed_llama.adapter import MANIFEST
    from fed_llama.errors import AdapterError

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(b"{}")
    (tmp_path / MANIFEST).write_text(json.dumps({"system_prompt": ["Be brief."]}))
    with pytest.raises(AdapterError, match="system_prompt that is no text"):
        read_manifest(tmp_path)


def test_an_export_tells_its_user_the_system_prompt_and_its_runtime_adds_it(
        tmp_path: Path) -> None:
    from fed_llama.export.build import ExportError
    from fed_llama.export.folder import MANIFEST, device_readme, exported_system_prompt

    assert exported_system_prompt(tmp_path) is None  # no manifest: the template's default
    manifest = {"system_prompt": "Be brief.",
                "runtime": {"onnxruntime-genai": {"loads": True, "version": "0.9.0"}}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert exported_system_prompt(tmp_path) == "Be brief."
    readme = device_readme(tmp_path, manifest)
    assert 'trained with the system message "Be brief."' in readme
    assert "{'role': 'system', 'content': 'Be brief.'}, {'role': 'user'" in readme
    assert "system message" not in device_readme(tmp_path, {**manifest, "system_prompt": None})

    for bad in ('{"system_prompt": 3}', "{not json"):
        (tmp_path / MANIFEST).write_text(bad)
        with pytest.raises(ExportError, match="export again"):
            exported_system_prompt(tmp_path)


def test_a_runtime_adapter_trained_with_another_system_message_is_refused(
        tmp_path: Path) -> None:
    """``fed-llama export-adapter``: the runtime asks every adapter of an export with the
    export's system message, so an adapter trained with another one is refused, naming both."""
    from fed_llama.adapter import MANIFEST as ADAPTER_MANIFEST
    from fed_llama.errors import AdapterError
    from fed_llama.export.folder import MANIFEST, exported_system_prompt
    from fed_llama.export.switchable import add_adapter

    export, adapter = tmp_path / "export", tmp_path / "site-2"
    export.mkdir()
    adapter.mkdir()
    (export / MANIFEST).write_text('{"method": "lora", "system_prompt": null, '
                                   '"verification": {"max-logit-diff": NaN}}')
    assert exported_system_prompt(export) is None  # our own manifest, NaN and all
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_bytes(b"{}")
    (adapter / ADAPTER_MANIFEST).write_text(json.dumps({"method": "lora", "system_prompt": ""}))
    with pytest.raises(AdapterError, match="trained with the system message \"\"; this export "
                                           "asks with the chat template's default"):
        add_adapter(adapter, export)
    assert sorted(p.name for p in export.iterdir()) == [MANIFEST]  # nothing written
