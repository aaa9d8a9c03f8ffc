"""The same apps on Flower's Deployment Engine: a real SuperLink and two SuperNodes on loopback.

The transport is secured with what ``fed-llama keys`` makes: TLS (a CA and the SuperLink's
certificate) and SuperNode authentication (each site's node key, registered with
``flwr supernode register``); a node whose key was never registered is turned away. Each
SuperNode's node config names its site (``partition-id``); ``flwr run .`` submits the app with
a run config that points at a tiny-model scenario. Two rounds run, signed and encrypted, and
every process the test started is stopped, whatever happens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import qa_records
from loopback import Loopback

from fed_llama.adapter import read_manifest

pytestmark = pytest.mark.deployment


@pytest.mark.parametrize("participation", ["all", "cyclic"])
def test_two_authenticated_supernodes_run_two_rounds_over_tls(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path, participation: str) -> None:
    """With ``cyclic`` participation the ServerApp first asks each SuperNode its site (a query
    message over the same TLS link), then each round goes to one site in turn."""
    for i in range(2):
        write_jsonl(qa_records(16 + 4 * i), name=f"site{i}.jsonl")
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(f'[backbone]\nname = "{tiny_backbone}"\n'
                        "[train]\nmax_steps = 2\nwarmup_steps = 1\nbatch_size = 4\n"
                        '[federation]\nrounds = 2\nsites = ["site0.jsonl", "site1.jsonl"]\n'
                        f'participation = "{participation}"\n')
    out = tmp_path / "run"
    with Loopback(tmp_path, tmp_path / "keys") as fed:
        fed.start_superlink()
        for site in ("site0", "site1"):
            fed.register(site)
        # its key was never registered: the SuperLink refuses to activate it
        intruder = fed.start_supernode("intruder", "intruder",
                                       "partition-id=0 num-partitions=2", "--max-retries", "1")
        for i in range(2):
            fed.start_supernode(f"supernode{i}", f"site{i}",
                                f"partition-id={i} num-partitions=2")
        run = fed.submit(f'scenario="{scenario}" out="{out}"')
        detail = fed.detail(run)
        assert run.returncode == 0, detail
        history = json.loads((out / "history.json").read_text())
        assert [row["round"] for row in history] == [1, 2], detail
        trained = 2 if participation == "all" else 1
        assert all(row["sites-trained"] == trained and row["sites-refused"] == 0
                   for row in history), detail
        if participation == "cyclic":  # site0's turn, then site1's
            assert ["site0/train-loss" in row for row in history] == [True, False]
            assert ["site1/train-loss" in row for row in history] == [False, True]
        manifest = read_manifest(out / "rounds" / "round-002")
        assert manifest["sites"] == ["site0", "site1"]
        assert (out / "seals" / "round-002.json").is_file()
        intruder.wait(timeout=60)
        refusal = fed.tail("intruder", 100_000)
        assert intruder.returncode != 0, refusal
        assert "Exit Code: 305" in refusal and "Failed to activate SuperNode" in refusal, refusal
    assert all(p.poll() is not None for p in fed.procs)
