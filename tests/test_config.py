"""Config: TOML into frozen dataclasses, every problem reported at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fed_llama.config import TrainConfig, build_config, load_config
from fed_llama.config.loader import apply_overrides, parse_override
from fed_llama.errors import ConfigError


def test_defaults_are_valid_and_frozen() -> None:
    cfg = build_config(TrainConfig, {}, source="defaults")
    assert cfg.backbone.name == "smollm2-135m"
    assert cfg.data.source == "icd10:cardiology"
    assert cfg.lora.modules() == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.r = 4  # type: ignore[misc]


def test_every_problem_is_listed_in_one_error() -> None:
    data = {"lora": {"r": 0, "alpha": 0}, "train": {"lr": -1.0, "bogus": 1},
            "backbone": {"quantization": "int3"}}
    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, data, source="site.toml")
    msg = str(err.value)
    assert msg.startswith("site.toml: 5 problems:")
    for expected in ("lora.r must be at least 1; got 0", "lora.alpha must be at least 1",
                     "train.lr must be positive; got -1.0", "unknown key train.bogus",
                     "backbone.quantization must be one of 'none', 'nf4'; got 'int3'"):
        assert expected in msg


def test_types_are_checked_not_coerced() -> None:
    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, {"train": {"max_steps": "10", "group_by_length": 1}},
                     source="x")
    assert "train.max_steps must be a whole number; got '10'" in str(err.value)
    assert "train.group_by_length must be true or false; got 1" in str(err.value)


def test_include_mlp_adds_mlp_projections_once() -> None:
    cfg = build_config(TrainConfig, {"lora": {"target_modules": ["q_proj", "up_proj"],
                                              "include_mlp": True}}, source="x")
    assert cfg.lora.modules() == ("q_proj", "up_proj", "gate_proj", "down_proj")


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text('[data]\nsource = "data/train.jsonl"\n')
    cfg = load_config(TrainConfig, tmp_path / "site.toml")
    assert cfg.data.source == str(tmp_path / "data" / "train.jsonl")
    assert cfg.data.heldout == ""  # empty stays empty


def test_overrides_parse_toml_values_and_fall_back_to_strings() -> None:
    assert parse_override("train.max_steps=5") == (["train", "max_steps"], 5)
    assert parse_override("data.source=icd10:oncology") == (["data", "source"],
                                                            "icd10:oncology")
    merged = apply_overrides({"train": {"lr": 1.0}}, ["train.max_steps=3", "lora.r=4"])
    assert merged == {"train": {"lr": 1.0, "max_steps": 3}, "lora": {"r": 4}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.max_steps")


def test_missing_and_malformed_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora\nr = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(TrainConfig, bad)


def test_template_in_the_site_kit_loads() -> None:
    template = Path(__file__).resolve().parents[1] / "client" / "site.toml"
    cfg = load_config(TrainConfig, template)
    assert cfg == build_config(TrainConfig, {}, source="defaults")


def test_builtin_data_sources_are_not_taken_for_paths(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text('[data]\nsource = "icd10:oncology"\n')
    assert load_config(TrainConfig, tmp_path / "site.toml").data.source == "icd10:oncology"


@pytest.mark.parametrize("scenario", sorted(
    (Path(__file__).resolve().parents[1] / "simulations").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_is_valid(scenario: Path) -> None:
    from fed_llama.launch.simulate import load_scenario

    loaded, _ = load_scenario(scenario, [])
    assert len(loaded.site_names()) >= 2
