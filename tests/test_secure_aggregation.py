"""Secure aggregation on Flower's SecAgg+ workflow: the aggregator sees only the sum.

End to end on the tiny model through the Simulation Engine: the global adapter of a SecAgg+
round equals the plain example-weighted FedAvg of the same sites' updates within the
quantization error, and a site that drops out of a round is tolerated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import qa_records

from fed_llama.errors import ConfigError
from fed_llama.launch.simulate import load_scenario, simulate

PLAIN = ["security.envelopes=false", "security.seal_rounds=false", "evaluation.questions=0"]
SECAGG = [*PLAIN, "secure_aggregation.enabled=true", "secure_aggregation.max_weight=100"]
TOLERANCE = 1e-4
"""Largest difference from the plain mean: SecAgg+ quantizes each value of [-1, 1] to 2^22
levels (step 4.8e-7) and each site's weight (its example count, 12 to 22 here) relative to
``max_weight`` to 2^22 levels; with the default max_weight of 1e5 these tiny sites' weights
would be off by up to 1e-3 (measured: a 2e-3 difference), real sites' (2,000+ examples) by 5e-6."""


def _scenario(tmp_path: Path, backbone: Path, write_jsonl, sites: int) -> Path:  # type: ignore[no-untyped-def]
    for i in range(sites):
        write_jsonl(qa_records(16 + 4 * i), name=f"site{i}.jsonl")
    names = [f"site{i}.jsonl" for i in range(sites)]
    path = tmp_path / f"scenario{sites}.toml"
    path.write_text(f'[backbone]\nname = "{backbone}"\n'
                    "[train]\nmax_steps = 3\nwarmup_steps = 1\nbatch_size = 4\n"
                    f"[federation]\nrounds = 1\nsites = {names}\n")
    return path


def _global(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "rounds" / "round-001" / "adapter_model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_the_secure_aggregate_is_the_plain_weighted_mean(tiny_backbone: Path, write_jsonl,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, 3)
    secure = simulate(scenario, tmp_path / "secure", overrides=SECAGG)
    plain = simulate(scenario, tmp_path / "plain", overrides=PLAIN)
    diff = _max_diff(_global(secure.out), _global(plain.out))
    assert 0 < diff < TOLERANCE  # masked and quantized, yet the same mean
    [row] = secure.history()
    assert row["sites-trained"] == 3 and row["sites-evaluated"] == 3
    # each site's masked update is measured, and is larger than the plain float32 arrays
    plain_row = plain.history()[0]
    for site in ("site0", "site1", "site2"):
        assert row[f"{site}/bytes-up"] > plain_row[f"{site}/bytes-up"]
    manifest = json.loads((secure.out / "rounds" / "round-001" / "fed_llama_manifest.json")
                          .read_text())
    assert manifest["secure_aggregation"] is True


def test_sites_keep_their_optimizer_under_secure_aggregation(tiny_backbone: Path,  # type: ignore[no-untyped-def]
                                                             write_jsonl, tmp_path: Path) -> None:
    """local_optimizer = "keep" through the SecAgg+ path: each site's AdamW state (never sent)
    carries into its next round, and the history shows its age as in a plain run."""
    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, 3)
    store = simulate(scenario, tmp_path / "secure", overrides=[
        *SECAGG, "federation.rounds=2", "federation.local_optimizer='keep'"])
    first, second = store.history()
    for site in ("site0", "site1", "site2"):  # 3 local steps a round: 3, then 3 + 3
        assert (first[f"{site}/optimizer-steps"], second[f"{site}/optimizer-steps"]) == (3, 6)


def test_a_site_that_drops_out_is_tolerated(tiny_backbone: Path, write_jsonl,  # type: ignore[no-untyped-def]
                                            tmp_path: Path) -> None:
    four = _scenario(tmp_path, tiny_backbone, write_jsonl, 4)
    secure = simulate(four, tmp_path / "secure", overrides=[
        *SECAGG, "attack.drop_sites=['site3']"])
    [row] = secure.history()
    assert row["sites-trained"] == 3 and row["sites-failed"] == 1
    three = _scenario(tmp_path, tiny_backbone, write_jsonl, 3)
    plain = simulate(three, tmp_path / "plain", overrides=PLAIN)  # the three that stayed
    assert _max_diff(_global(secure.out), _global(plain.out)) < TOLERANCE


def test_configurations_that_cannot_work_are_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[federation]\nsites = ["icd10:cardiology", "icd10:oncology"]\n'
                    'aggregation = "exact"\n[secure_aggregation]\nenabled = true\n')
    with pytest.raises(ConfigError) as err:
        load_scenario(path, [])
    msg = str(err.value)
    assert "secure_aggregation needs at least 3 sites" in msg
    assert "aggregation = 'exact' needs each site's B·A product" in msg
    assert "set security.envelopes = false" in msg
