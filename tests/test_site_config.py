"""A real site's own configuration, and the federation's settings that reach it in the run's
messages: the site reads nothing of the aggregator's, and refuses a run it did not agree to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fed_llama.client.federation import SiteFailure, membership, named
from fed_llama.config.loader import build_config
from fed_llama.config.run_settings import federation_settings, site_scenario
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.config.site import SITE_CONFIG, SiteConfig, load_site_config
from fed_llama.errors import ConfigError
from fed_llama.wire import BACKBONE_SHA256, SETTINGS


def aggregator_scenario(**lora: int) -> ScenarioConfig:
    return build_config(ScenarioConfig, {
        "backbone": {"name": "/srv/aggregator/backbone"},
        "lora": {"r": 4, "alpha": 8, **lora},
        "train": {"max_steps": 5, "warmup_steps": 1},
        "data": {"max_length": 128},
        "federation": {"rounds": 3, "sites": ["/srv/aggregator/cardiology.jsonl",
                                              "/srv/aggregator/oncology.jsonl"]},
        "security": {"keys": "/srv/aggregator/keys", "passphrase_env": "AGGREGATOR_PASS"},
        "attack": {"drop_sites": ["oncology"]}}, source="test")


def oncology(tmp_path: Path, **extra: object) -> SiteConfig:
    return build_config(SiteConfig, {
        "name": "oncology", "source": "/srv/site/train.jsonl", "heldout": "/srv/site/ho.jsonl",
        "passphrase_env": "ONCOLOGY_PASS", "backbone": str(tmp_path), "lora": {"r": 4,
                                                                              "alpha": 8},
        **extra}, source="test")


def test_the_settings_sent_to_sites_hold_none_of_the_aggregators_paths_or_secrets() -> None:
    text = federation_settings(aggregator_scenario())
    assert "/srv/aggregator" not in text and "AGGREGATOR_PASS" not in text
    data = json.loads(text)
    assert data["federation"]["sites"] == ["cardiology", "oncology"]
    assert "attack" not in data  # simulated attacks are no instruction to a real site
    assert data["lora"]["r"] == 4 and data["train"]["max_steps"] == 5


def test_a_site_trains_the_federations_settings_on_its_own_data_and_keys(
        tmp_path: Path) -> None:
    scenario, index = site_scenario(federation_settings(aggregator_scenario()),
                                    oncology(tmp_path))
    assert index == 1
    assert scenario.federation.sites[1] == "/srv/site/train.jsonl"
    assert scenario.data.heldout == "/srv/site/ho.jsonl" and scenario.data.max_length == 128
    assert scenario.backbone.name == str(tmp_path)
    assert scenario.security.passphrase_env == "ONCOLOGY_PASS" and not scenario.security.keys
    assert scenario.attack.drop_sites == ()
    assert (scenario.federation.rounds, scenario.train.max_steps) == (3, 5)


@pytest.mark.parametrize(("lora", "said"), [
    ({"r": 8}, "the run's lora.r is 8, the site agreed to 4"),
    ({"alpha": 16}, "the run's lora.alpha is 16, the site agreed to 8"),
])
def test_a_site_refuses_a_run_of_another_adapter_shape(tmp_path: Path, lora: dict[str, int],
                                                        said: str) -> None:
    with pytest.raises(ConfigError, match=f"site 'oncology' refuses the run: {said}"):
        site_scenario(federation_settings(aggregator_scenario(**lora)), oncology(tmp_path))


def test_a_site_refuses_a_run_of_another_method(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the run trains lora, the site agreed to qlora"):
        site_scenario(federation_settings(aggregator_scenario()),
                      oncology(tmp_path, method="qlora"))


@pytest.mark.parametrize(("settings", "said"), [
    (None, "carry no federation settings"),
    ("{not json", "not JSON"),
    ("[1, 2]", "not a scenario's tables"),
])
def test_malformed_settings_are_refused_in_one_line(tmp_path: Path, settings: object,
                                                    said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        site_scenario(settings, oncology(tmp_path))


def test_settings_with_an_unknown_key_are_refused_in_one_line(tmp_path: Path) -> None:
    data = json.loads(federation_settings(aggregator_scenario()))
    data["federation"]["exfiltrate"] = True
    with pytest.raises(ConfigError, match=r"unknown key federation.exfiltrate") as caught:
        site_scenario(json.dumps(data), oncology(tmp_path))
    assert "\n" not in str(caught.value)


def test_a_site_not_in_the_federation_says_which_names_it_has(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"the federation's sites are \['cardiology', "
                       r"'oncology'\]; this site's config names 'neurology'"):
        site_scenario(federation_settings(aggregator_scenario()),
                      oncology(tmp_path, name="neurology"))


def test_a_site_config_file_resolves_its_paths_and_refuses_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('name = "oncology"\nsource = "data/train.jsonl"\nsite_key = "keys/o.key"\n'
                    'backbone = "smollm2-135m"\n[lora]\nr = 4\n')
    site = load_site_config(path)
    assert site.source == str(tmp_path / "data/train.jsonl")
    assert site.site_key == str(tmp_path / "keys/o.key")
    assert site.backbone == "smollm2-135m"  # a built-in name is no path
    path.write_text('name = ""\nsource = "x.jsonl"\nscenario = "/srv/aggregator/s.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    assert "unknown key scenario" in str(caught.value) and "name must be" in str(caught.value)


def test_a_site_refuses_a_run_on_another_backbone_and_names_itself(tiny_backbone: Path,
                                                                   tmp_path: Path) -> None:
    from fed_llama.backbone.load import resolve_backbone

    path = tmp_path / "site.toml"
    path.write_text(f'name = "oncology"\nsource = "train.jsonl"\nbackbone = "{tiny_backbone}"\n'
                    'site_key = "o.key"\nserver_public = "server.pub.json"\n'
                    '[lora]\nr = 4\nalpha = 8\n')
    node = {SITE_CONFIG: str(path)}
    settings = federation_settings(aggregator_scenario())
    sha = resolve_backbone(str(tiny_backbone)).sha256
    member = membership({SETTINGS: settings, BACKBONE_SHA256: sha}, node, {})
    assert (member.name, member.index) == ("oncology", 1)
    assert member.key_paths == {"site-key": str(tmp_path / "o.key"),
                                "server-public": str(tmp_path / "server.pub.json")}
    with pytest.raises(SiteFailure, match=r"site 'oncology' refuses the run: its backbone .* "
                       r"has sha256 " + sha[:12]):
        membership({SETTINGS: settings, BACKBONE_SHA256: "0" * 64}, node, {})
    # any other failure on a real site is reported under the site's name, in one line
    with pytest.raises(SiteFailure, match=r"^site 'oncology': the key file\s+is gone$"), \
            named(node):
        raise OSError("the key file\n  is gone")


def test_the_site_kits_template_is_a_valid_site_config() -> None:
    site = load_site_config(Path(__file__).resolve().parents[1] / "client" /
                            "site-federation.toml")
    assert (site.name, site.method, site.lora.r, site.lora.alpha) == ("cardiology", "lora", 8,
                                                                      16)
    assert site.passphrase_env == "CARDIOLOGY_PASSPHRASE"
