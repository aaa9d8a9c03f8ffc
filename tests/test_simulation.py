"""A federation on Flower's Simulation Engine, end to end on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import qa_records

from fed_llama.adapter import read_manifest
from fed_llama.cli.main import main
from fed_llama.errors import ConfigError
from fed_llama.launch.simulate import load_scenario


def _scenario(tmp_path: Path, backbone: Path, write_jsonl, rounds: int,  # type: ignore[no-untyped-def]
              aggregation: str = "factors", strategy: str = "fedavg") -> Path:
    for i in range(2):
        write_jsonl(qa_records(16 + 4 * i), name=f"site{i}.jsonl")
    path = tmp_path / "scenario.toml"
    path.write_text(f'[backbone]\nname = "{backbone}"\n'
                    "[train]\nmax_steps = 3\nwarmup_steps = 1\nbatch_size = 4\n"
                    f'[federation]\nrounds = {rounds}\nsites = ["site0.jsonl", "site1.jsonl"]\n'
                    f'aggregation = "{aggregation}"\nstrategy = "{strategy}"\n')
    return path


def test_two_sites_two_rounds_then_resume(tiny_backbone: Path, write_jsonl, tmp_path: Path,  # type: ignore[no-untyped-def]
                                          capsys: pytest.CaptureFixture[str]) -> None:
    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=2)
    out = tmp_path / "run"
    assert main(["-q", "simulate", str(scenario), "--out", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [row["round"] for row in history] == [1, 2]
    for row in history:
        assert row["sites-trained"] == 2 and row["sites-evaluated"] == 2
        assert row["site0/perplexity"] > 0 and row["site1/perplexity"] > 0
        assert row["sites-refused"] == 0
        # each message's own timings: the backbone and data load, then the work
        assert row["site0/train-seconds"] > 0 and row["site1/evaluate-seconds"] > 0
        assert row["site0/train-load-seconds"] >= 0 and row["site1/evaluate-load-seconds"] >= 0
        # and the clocks of each phase, in order: made, handed to the site, done, received
        for phase in ("train", "evaluate"):
            for site in ("site0", "site1"):
                assert (row[f"{phase}-sent-at"] <= row[f"{site}/{phase}-started-at"]
                        <= row[f"{site}/{phase}-done-at"] <= row[f"{phase}-received-at"])
        assert row["train-received-at"] <= row["evaluate-sent-at"]
        # each update travels signed and encrypted: its tensors plus the envelope's overhead
        assert row["bytes-down"] < row["bytes-up"] < row["backbone-bytes"]
        assert row["site0/bytes-up"] + row["site1/bytes-up"] == row["bytes-up"]
    # the simulation made every party's keys (private ones 0600) and sealed every round
    assert (out / "keys" / "server.key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (out / "seals").iterdir()) == ["round-001.json",
                                                                  "round-002.json"]
    seals = [json.loads((out / "seals" / f"round-00{r}.json").read_text()) for r in (1, 2)]
    assert seals[1]["prev"] != seals[0]["prev"] and seals[0]["run"] == seals[1]["run"]
    manifest = read_manifest(out / "rounds" / "round-002")
    assert manifest["round"] == 2 and manifest["sites"] == ["site0", "site1"]
    assert (out / "perplexity.png").stat().st_size > 0 and (out / "history.csv").is_file()
    # task accuracy every round: each site's and the question-weighted pooled score
    for row in history:
        assert 0 <= row["site0/answer/exact"] <= 1 and 0 <= row["pooled/answer/f1"] <= 1
        n0, n1 = row["site0/answer/n"], row["site1/answer/n"]
        assert row["pooled/answer/f1"] == pytest.approx(
            (n0 * row["site0/answer/f1"] + n1 * row["site1/answer/f1"]) / (n0 + n1))
    assert (out / "tasks.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "2 round(s)" in printed
    # the summary names the last round's pooled task scores as the history holds them
    last = history[-1]
    assert (f"pooled task scores after round 2 (greedy answers to held-out questions): "
            f"answer/exact {last['pooled/answer/exact']:.3f}, "
            f"answer/f1 {last['pooled/answer/f1']:.3f}") in printed

    # the run is extended to 3 rounds: --resume trains round 3 only, from round 2's adapter
    scenario.write_text(scenario.read_text().replace("rounds = 2", "rounds = 3"))
    with pytest.raises(ConfigError, match="scenario differs"):
        from fed_llama.launch.simulate import simulate

        simulate(scenario, out, resume=True)
    scenario.write_text(scenario.read_text().replace("rounds = 3", "rounds = 2"))
    assert main(["-q", "simulate", str(scenario), "--out", str(out), "--resume"]) == 0
    assert [row["round"] for row in json.loads((out / "history.json").read_text())] == [1, 2]


def test_fedprox_sites_train_with_the_proximal_term(tiny_backbone: Path, write_jsonl,  # type: ignore[no-untyped-def]
                                                    tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=1, strategy="fedprox")
    out = tmp_path / "run"
    assert main(["-q", "simulate", str(scenario), "--out", str(out),
                 "--set", "federation.proximal_mu=0.1"]) == 0
    [row] = json.loads((out / "history.json").read_text())
    assert row["sites-trained"] == 2 and math.isfinite(row["pooled-perplexity"])
    assert read_manifest(out / "rounds" / "round-001")["strategy"] == "fedprox"


def test_sites_of_different_ranks_federate_at_the_global_rank(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=2, aggregation="exact")
    out = tmp_path / "run"
    assert main(["-q", "simulate", str(scenario), "--out", str(out),
                 "--set", "federation.site_ranks=[2, 8]"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [row["sites-trained"] for row in history] == [2, 2]
    assert all(row["sites-refused"] == 0 for row in history)
    weights = load_file(out / "rounds" / "round-002" / "adapter_model.safetensors")
    ranks = {v.shape[0] for k, v in weights.items() if "lora_A" in k}
    assert ranks == {8}  # the global adapter keeps lora.r
    # the rank-2 site learned from round 1 on: round 2 starts from a non-zero product
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)


def test_a_run_folder_is_never_reused_without_resume(tiny_backbone: Path, write_jsonl,  # type: ignore[no-untyped-def]
                                                     tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=1)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    from fed_llama.launch.simulate import simulate

    with pytest.raises(ConfigError, match="already holds a run: pass --resume"):
        simulate(scenario, out)
    with pytest.raises(ConfigError, match="holds no run"):
        simulate(scenario, out, resume=True)
    assert (out / "notes.txt").read_text() == "keep"


def test_a_named_key_folder_is_checked_before_any_work(tiny_backbone: Path, write_jsonl,  # type: ignore[no-untyped-def]
                                                      tmp_path: Path) -> None:
    from fed_llama.crypto.keyring import KeyFolder
    from fed_llama.launch.simulate import simulate

    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=1)
    keys = tmp_path / "keys"
    with pytest.raises(ConfigError, match="does not exist: run fed-llama keys init-server"):
        simulate(scenario, tmp_path / "run", overrides=[f"security.keys='{keys}'"])
    folder = KeyFolder(keys)
    folder.init_server("x25519")
    folder.init_site("site0")
    with pytest.raises(ConfigError) as err:
        simulate(scenario, tmp_path / "run", overrides=[f"security.keys='{keys}'"])
    assert "site 'site0' is not enrolled" in str(err.value)
    assert "site1.key is missing: run fed-llama keys init-site site1" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_bad_scenarios_are_refused_before_any_work(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[federation]\nrounds = 0\nsites = ["icd10:cardiology"]\n'
                    'aggregation = "exact"\nrobust = "median"\n')
    with pytest.raises(ConfigError) as err:
        load_scenario(path, [])
    msg = str(err.value)
    assert "federation.rounds must be at least 1" in msg
    assert "federation.sites must list at least 2" in msg
    assert "robust = 'median' works on factor averages" in msg
    path.write_text('[federation]\nsites = ["icd10:cardiology", "icd10:oncology"]\n'
                    '[attack]\npoison_sites = ["neurology"]\n')
    with pytest.raises(ConfigError, match=r"attack.poison_sites/drop_sites/slow_sites name "
                       r"\['neurology'\], not sites of this scenario"):
        load_scenario(path, [])
    path.write_text('[federation]\nsites = ["icd10:cardiology", "missing.jsonl"]\n')
    with pytest.raises(ConfigError, match=r"data file .*missing\.jsonl' does not exist"):
        load_scenario(path, [])


def test_a_slow_site_replies_late_in_the_rounds_it_is_slow_in_only(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[attack] slow_sites: the straggler drill's fault (benchmarks/drills.py)."""
    from fed_llama.client import site as site_ops
    from fed_llama.training.site_model import initial_state

    path = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=3)
    with path.open("a") as f:
        f.write('[attack]\nslow_sites = ["site1"]\nslow_seconds = 300.0\nslow_rounds = [2]\n')
    scenario, _ = load_scenario(path, [])
    waited: list[float] = []
    monkeypatch.setattr(site_ops.time, "sleep", waited.append)
    state = initial_state(scenario)
    for server_round in (1, 2, 3):
        for site in (0, 1):
            site_ops.fit(scenario, site, state, server_round)
    assert waited == [300.0]  # site1, round 2
    for bad, said in (("slow_seconds = 0.0", "slow_seconds must be a positive number"),
                      ("slow_seconds = 5.0\nslow_rounds = [0]", "slow_rounds are round numbers")):
        path.write_text(path.read_text().split("[attack]")[0]
                        + f'[attack]\nslow_sites = ["site1"]\n{bad}\n')
        with pytest.raises(ConfigError, match=said):
            load_scenario(path, [])


def test_a_poisoning_site_is_refused_and_the_round_is_the_honest_sites_mean(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from fed_llama.launch.simulate import simulate

    for i in range(3):
        write_jsonl(qa_records(16 + 4 * i), name=f"site{i}.jsonl")

    def run(name: str, sites: list[str], *extra: str) -> tuple[dict[str, float], Path]:
        path = tmp_path / f"{name}.toml"
        path.write_text(f'[backbone]\nname = "{tiny_backbone}"\n'
                        "[train]\nmax_steps = 3\nwarmup_steps = 1\nbatch_size = 4\n"
                        "[evaluation]\nquestions = 0\n"
                        f"[federation]\nrounds = 1\nsites = {sites}\n")
        store = simulate(path, tmp_path / name, overrides=list(extra))
        return json.loads((store.out / "history.json").read_text())[0], store.out

    row, out = run("attacked", ["site0.jsonl", "site1.jsonl", "site2.jsonl"],
                   "attack.poison_sites=['site2']")
    assert row["sites-trained"] == 2 and row["refused/norm-bound"] == 1
    honest, honest_out = run("honest", ["site0.jsonl", "site1.jsonl"])
    attacked = load_file(out / "rounds" / "round-001" / "adapter_model.safetensors")
    expected = load_file(honest_out / "rounds" / "round-001" / "adapter_model.safetensors")
    for key, value in expected.items():  # the same global adapter as without site2 at all
        assert attacked[key].equal(value), key
    assert row["pooled-perplexity"] != honest["pooled-perplexity"]  # site2's held-out counts


def test_encrypted_checkpoints_resume_after_a_crash(tiny_backbone: Path, write_jsonl,  # type: ignore[no-untyped-def]
                                                    tmp_path: Path) -> None:
    import shutil

    import torch

    from fed_llama.adapter.store import SEALED_WEIGHTS
    from fed_llama.crypto import ServerKey
    from fed_llama.crypto.at_rest import checkpoint_ciphers
    from fed_llama.crypto.keyring import KeyFolder
    from fed_llama.launch.simulate import simulate
    from fed_llama.server.checkpoint import RunStore

    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=2)
    out = tmp_path / "run"
    # FedAvgM with momentum: round 2's step depends on round 1's, which only the server
    # optimizer's saved state remembers across the crash
    extra = ["security.encrypt_checkpoints=true", "evaluation.questions=0",
             "federation.strategy='fedavgm'", "federation.server_momentum=0.9"]
    simulate(scenario, out, overrides=extra)
    for r in (1, 2):
        assert (out / "rounds" / f"round-00{r}" / SEALED_WEIGHTS).is_file()
        assert not (out / "rounds" / f"round-00{r}" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "optimizer").iterdir()) == [
        "round-001.safetensors.hpke", "round-002.safetensors.hpke"]
    store = RunStore(out)
    _, decrypt = checkpoint_ciphers(ServerKey.load(KeyFolder(out / "keys").server_key))
    straight = store.load_round(2, decrypt)
    momentum = store.load_optimizer(1, decrypt)
    assert momentum is not None and set(momentum) == {f"momentum_vector/{k}" for k in straight}
    # the aggregator crashed before round 2 was recorded: --resume decrypts round 1 and its
    # momentum, redoes round 2, and lands where the uninterrupted run did
    (out / "history.json").write_text(json.dumps(store.history()[:1]))
    shutil.rmtree(out / "rounds" / "round-002")
    simulate(scenario, out, resume=True, overrides=extra)
    assert [row["round"] for row in store.history()] == [1, 2]
    assert (out / "rounds" / "round-002" / SEALED_WEIGHTS).is_file()
    resumed = store.load_round(2, decrypt)
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, atol=1e-6), key


@pytest.mark.parametrize("local_optimizer", ["restart", "keep"])
def test_cyclic_participation_trains_one_site_per_round_in_turn(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path, local_optimizer: str) -> None:
    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=3)
    scenario.write_text(scenario.read_text() + 'participation = "cyclic"\n'
                        f'local_optimizer = "{local_optimizer}"\n')
    out = tmp_path / "run"
    assert main(["-q", "simulate", str(scenario), "--out", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    turns = [[s for s in ("site0", "site1") if f"{s}/train-loss" in row] for row in history]
    assert turns == [["site0"], ["site1"], ["site0"]]
    for row in history:  # every site still evaluates the adapter every round
        assert row["sites-trained"] == 1 and row["sites-evaluated"] == 2
        assert row["bytes-up"] == row["site0/bytes-up" if "site0/train-loss" in row
                                      else "site1/bytes-up"]
    assert read_manifest(out / "rounds" / "round-003")["participation"] == "cyclic"
    ages = [row.get(f"{s}/optimizer-steps") for row, s in
            zip(history, ("site0", "site1", "site0"), strict=True)]
    # "keep": site0's second turn continues the AdamW moments of its first (3 + 3 steps),
    # held in its Flower node state between turns; "restart": no moments are kept
    assert ages == ([3.0, 3.0, 6.0] if local_optimizer == "keep" else [None, None, None])


def test_kept_local_optimizers_are_refused_where_the_factors_are_re_factorized(
        tmp_path: Path) -> None:
    path = tmp_path / "keep.toml"
    path.write_text('[federation]\nsites = ["icd10:cardiology", "icd10:oncology"]\n'
                    'local_optimizer = "keep"\naggregation = "exact"\n')
    with pytest.raises(ConfigError, match=r"local_optimizer = 'keep' .* but aggregation = "
                       r"'exact' re-factorizes A and B between rounds"):
        load_scenario(path, [])
    path.write_text('[federation]\nsites = ["icd10:cardiology", "icd10:oncology"]\n'
                    'local_optimizer = "keep"\nsite_ranks = [8, 4]\n')
    with pytest.raises(ConfigError, match=r"but site_ranks = \[8, 4\] re-factorizes"):
        load_scenario(path, [])
    path.write_text('[federation]\nsites = ["icd10:cardiology", "icd10:oncology"]\n'
                    'local_optimizer = "keep"\naggregation = "ffa"\n')
    assert load_scenario(path, [])[0].federation.local_optimizer == "keep"


def test_the_initial_adapter_stays_the_seeded_one_after_training_in_the_process(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:
    import torch

    from fed_llama.client import site as site_ops
    from fed_llama.training import site_model

    scenario, _ = load_scenario(_scenario(tmp_path, tiny_backbone, write_jsonl, rounds=1), [])
    before = site_model.initial_state(scenario)
    assert all(float(v.abs().max()) == 0 for k, v in before.items() if "lora_B" in k)
    trained, _, _ = site_ops.fit(scenario, 0, before, server_round=1)
    assert any(not torch.equal(trained[k], before[k]) for k in before)
    # the process's model now holds the trained adapter; the initial one is still B = 0
    after = site_model.initial_state(scenario)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_evaluate_every_skips_held_out_evaluation_between_rounds_but_loses_no_round(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:
    import shutil

    import torch

    from fed_llama.launch.simulate import simulate
    from fed_llama.server.checkpoint import RunStore

    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=3)
    out = tmp_path / "run"
    extra = ["federation.participation='cyclic'", "federation.evaluate_every=2",
             "evaluation.questions=0"]
    store = simulate(scenario, out, overrides=extra)
    history = store.history()
    # every round trains, checkpoints and has its row; rounds 2 (every 2nd) and 3 (the last)
    # are evaluated on both sites, round 1 is not
    assert [row["round"] for row in history] == [1, 2, 3]
    assert [row["sites-trained"] for row in history] == [1, 1, 1]
    assert ["pooled-perplexity" in row for row in history] == [False, True, True]
    assert [row.get("sites-evaluated") for row in history] == [None, 2, 2]
    assert history[0]["site0/train-loss"] > 0 and history[0]["bytes-up"] > 0
    assert all((out / "rounds" / f"round-00{r}" / "adapter_config.json").is_file()
               for r in (1, 2, 3))
    assert (out / "perplexity.png").stat().st_size > 0
    straight = store.load_round(3)
    # a crash after round 1: that unevaluated round counts as complete, so --resume
    # redoes rounds 2 and 3 only and lands where the uninterrupted run did
    (out / "history.json").write_text(json.dumps(history[:1]))
    for r in (2, 3):
        shutil.rmtree(out / "rounds" / f"round-00{r}")
    assert RunStore(out).completed_rounds() == 1
    simulate(scenario, out, resume=True, overrides=extra)
    assert [row["round"] for row in store.history()] == [1, 2, 3]
    resumed = store.load_round(3)
    for key, value in straight.items():
        assert torch.allclose(resumed[key], value, atol=1e-6), key


def test_a_carried_evaluation_changes_when_a_round_is_evaluated_not_what_it_measures(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:
    import shutil

    from fed_llama.launch.simulate import simulate
    from fed_llama.server.checkpoint import RunStore

    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=3)
    base = ["evaluation.questions=0"]
    plain = simulate(scenario, tmp_path / "plain", overrides=base).history()
    out = tmp_path / "carried"
    carry = [*base, "federation.carry_evaluation=true"]
    carried = simulate(scenario, out, overrides=carry).history()
    # every round's row holds its own adapter's evaluation: the same held-out loss per site
    # and the same training, though rounds 1 and 2 were evaluated by the next round's
    # training messages (signed, encrypted updates, the evaluation beside each envelope)
    assert [row["round"] for row in carried] == [1, 2, 3]
    for mine, theirs in zip(carried, plain, strict=True):
        assert mine["sites-evaluated"] == theirs["sites-evaluated"] == 2
        for key in ("pooled-loss", "site0/loss", "site1/loss", "train-loss"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (mine["round"], key)
    # the time went where it was spent: in the training messages of rounds 2 and 3, and in
    # round 3's own evaluation messages (no next round carries it)
    assert [("site0/carried-evaluate-seconds" in row) for row in carried] == [False, True, True]
    assert [("site0/evaluate-seconds" in row) for row in carried] == [False, False, True]
    assert all(row["site1/carried-evaluate-seconds"] > 0 for row in carried[1:])
    # a crash after round 2's checkpoint, before round 3 carried its evaluation back: round 2
    # counts as complete, and --resume's first training messages evaluate its adapter
    (out / "history.json").write_text(json.dumps(
        [carried[0], {k: v for k, v in carried[1].items()
                      if not k.startswith(("pooled", "sites-evaluated")) and
                      not k.endswith(("/loss", "/perplexity"))}]))
    shutil.rmtree(out / "rounds" / "round-003")
    assert RunStore(out).completed_rounds() == 2
    simulate(scenario, out, resume=True, overrides=carry)
    resumed = RunStore(out).history()
    assert [row["round"] for row in resumed] == [1, 2, 3]
    assert resumed[1]["pooled-loss"] == pytest.approx(plain[1]["pooled-loss"], rel=1e-5)
    assert resumed[2]["pooled-loss"] == pytest.approx(plain[2]["pooled-loss"], rel=1e-5)


def test_evaluate_every_is_checked_at_load(tmp_path: Path) -> None:
    path = tmp_path / "every.toml"
    path.write_text('[federation]\nsites = ["icd10:cardiology", "icd10:oncology"]\n'
                    "evaluate_every = 0\n")
    with pytest.raises(ConfigError, match=r"evaluate_every must be at least 1 .*got 0"):
        load_scenario(path, [])
    path.write_text('[federation]\nsites = ["icd10:cardiology", "icd10:oncology", '
                    '"icd10:psychiatry"]\nevaluate_every = 3\n'
                    "[security]\nenvelopes = false\nseal_rounds = false\n"
                    "[secure_aggregation]\nenabled = true\n")
    with pytest.raises(ConfigError, match=r"SecAgg\+ workflow\) evaluate every round: set "
                       r"federation.evaluate_every = 1 \(got 3\)"):
        load_scenario(path, [])
    with pytest.raises(ConfigError, match=r"evaluate in messages of their own: set "
                       r"federation.carry_evaluation = false"):
        load_scenario(path, ["federation.evaluate_every=1", "federation.carry_evaluation=true"])
    path.write_text('[federation]\nsites = ["icd10:cardiology", "icd10:oncology"]\n'
                    "participation = 'cyclic'\ncarry_evaluation = true\n")
    with pytest.raises(ConfigError, match=r"carry_evaluation has the next round's training "
                       r"messages evaluate, but a cyclic round trains one site"):
        load_scenario(path, [])


def test_the_warm_up_is_checked_against_the_schedule_it_warms(tmp_path: Path) -> None:
    path = tmp_path / "warmup.toml"
    sites = 'sites = ["icd10:cardiology", "icd10:oncology"]\n'
    # one schedule across the rounds: 90 turns of 2 steps may warm up for 2 (or 179) steps
    path.write_text(f"[train]\nmax_steps = 2\nwarmup_steps = 2\n[federation]\n{sites}"
                    "rounds = 90\nparticipation = 'cyclic'\n")
    scenario, _ = load_scenario(path, [])
    assert (scenario.train.max_steps, scenario.train.warmup_steps) == (2, 2)
    with pytest.raises(ConfigError, match=r"train.warmup_steps must be in \[0, 180\) \(the "
                       r"learning-rate schedule's steps, federation.rounds x train.max_steps"
                       r".*got 180"):
        load_scenario(path, ["train.warmup_steps=180"])
    # a fresh schedule every round: the warm-up must end within the round
    with pytest.raises(ConfigError, match=r"train.warmup_steps must be in \[0, 2\) .*"
                       r"lr_schedule = 'per-round'\); got 2"):
        load_scenario(path, ["federation.lr_schedule='per-round'"])


def test_a_run_folder_that_cannot_be_written_stops_the_run_in_one_line_and_resumes(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from fed_llama.server.checkpoint import RunStore

    scenario = _scenario(tmp_path, tiny_backbone, write_jsonl, rounds=2)
    out = tmp_path / "run"
    save_round = RunStore.save_round

    def read_only_from_round_2(self, server_round, *args, **kwargs):  # type: ignore[no-untyped-def]
        if server_round == 2:  # the disk turns read-only as round 2 is checkpointed
            raise OSError(errno.EROFS, "Read-only file system",
                          str(self.round_dir(server_round)))
        return save_round(self, server_round, *args, **kwargs)

    monkeypatch.setattr(RunStore, "save_round", read_only_from_round_2)
    args = ["-q", "simulate", str(scenario), "--out", str(out),
            "--set", "evaluation.questions=0"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fed-llama: error: the run folder") and "Read-only file system" in \
        error and "rounds 1-1 are intact" in error and "--resume" in error
    assert read_manifest(out / "rounds" / "round-001")["round"] == 1  # intact
    assert not (out / "rounds" / "round-002").exists()
    # writable again (in a process of its own, as an operator would run it: a simulation
    # whose ServerApp raised leaves Flower's engine unusable in this one)
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "fed_llama.cli.main", *args, "--resume"], check=True,
                   stdout=subprocess.DEVNULL)
    assert [row["round"] for row in json.loads((out / "history.json").read_text())] == [1, 2]
    assert main(["audit", str(out)]) == 0  # no round lost or applied twice, seals chained


def _two_icd10_sites(tmp_path: Path, backbone: Path, evaluation: str) -> Path:
    """A one-round scenario of two ICD-10 sites (40 held-out records each) on ``backbone``,
    with ``evaluation`` as its [evaluation] section (answers of at most 2 tokens)."""
    path = tmp_path / "scenario.toml"
    path.write_text(f'[backbone]\nname = "{backbone}"\n[train]\nmax_steps = 1\n'
                    "warmup_steps = 0\n[data]\nmax_heldout_records = 40\n"
                    f"[evaluation]\n{evaluation}\nmax_new_tokens = 2\n"
                    '[federation]\nrounds = 1\nsites = ["icd10:cardiology", "icd10:oncology"]\n')
    return path


def test_evaluation_tasks_chooses_the_kinds_of_question_each_site_is_asked(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, tmp_path: Path) -> None:
    """[evaluation] tasks: the main job asks description -> code questions only."""
    from fed_llama.client import site as site_ops
    from fed_llama.training.site_model import initial_state

    path = _two_icd10_sites(tmp_path, tiny_backbone, "questions = 3")
    every, _ = load_scenario(path, [])
    codes, _ = load_scenario(path, ["evaluation.tasks=['desc2code']"])
    state = initial_state(every)
    asked = {k.split("/")[1] for k in site_ops.evaluate(every, 0, state) if k.startswith("task/")}
    only = site_ops.evaluate(codes, 0, state)
    assert asked == {"desc2code", "code2desc", "includes", "excludes"}
    assert {k.split("/")[1] for k in only if k.startswith("task/")} == {"desc2code"}
    assert only["task/desc2code/n"] == 3
    with pytest.raises(ConfigError, match=r"evaluation.*tasks must name kinds of question"):
        load_scenario(path, ["evaluation.tasks=['diagnosis']"])


def test_perplexity_can_take_a_sample_while_the_questions_use_the_whole_held_out_set(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, tmp_path: Path) -> None:
    """[evaluation] perplexity_records: the perplexity of a seeded sample of the held-out
    records (the same records every round), the questions from all of them."""
    from fed_llama.client import site as site_ops
    from fed_llama.data.source import sample
    from fed_llama.training.loss import heldout_loss
    from fed_llama.training.site_model import initial_state, loaded_site_model

    path = _two_icd10_sites(tmp_path, tiny_backbone, "questions = 50\ntasks = ['desc2code']")
    whole, _ = load_scenario(path, [])
    part, _ = load_scenario(path, ["evaluation.perplexity_records=7"])
    state = initial_state(whole)
    full, sampled = site_ops.evaluate(whole, 0, state), site_ops.evaluate(part, 0, state)
    assert (full["num-examples"], sampled["num-examples"]) == (40, 7)
    assert sampled["task/desc2code/n"] == full["task/desc2code/n"]  # every desc2code question
    data = site_ops.site_data(part, 0)
    seven = sample(data.heldout, 7, part.train.seed)
    assert seven == sample(data.heldout, 7, part.train.seed)  # the same records each time
    loaded = loaded_site_model(part)  # holding the state just evaluated
    expected = heldout_loss(loaded.model, seven, 16, loaded.tokenizer.pad_token_id)
    assert sampled["heldout-loss"] == pytest.approx(expected.loss, rel=1e-5)
    with pytest.raises(ConfigError, match="perplexity_records must be 0"):
        load_scenario(path, ["evaluation.perplexity_records=-1"])
