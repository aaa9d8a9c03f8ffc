"""A normal ``fed-llama simulate`` prints our progress and results, and nothing that a
third-party library warns about (run as a user runs it: a fresh process, Ray workers and all)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import qa_records

# what a library's notice looks like on the console: a Python warning ("...: FutureWarning: ..."),
# a logger's warning (ours are "WARNING fed_llama.<module>: ..."), Flower's coloured
# "WARNING :" lines, a traceback, or bitsandbytes' missing-kernel line (logged bare in a worker)
THIRD_PARTY = re.compile(r"Warning:|WARNING|Traceback|DEPRECATED|Failed to load", re.IGNORECASE)
OURS = re.compile(r"^WARNING fed_llama\.")


def test_a_short_simulation_prints_no_third_party_warning(tiny_backbone: Path, write_jsonl,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:
    for i in range(2):
        write_jsonl(qa_records(12), name=f"site{i}.jsonl")
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(f'[backbone]\nname = "{tiny_backbone}"\n'
                        "[train]\nmax_steps = 2\nwarmup_steps = 1\nbatch_size = 4\n"
                        '[federation]\nrounds = 1\nsites = ["site0.jsonl", "site1.jsonl"]\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, "-m", "fed_llama.cli.main", "simulate", str(scenario),
         "--out", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    # the run happened and said so: our progress and our results
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["round"] == 1
    assert "fed_llama.simulation.runner: simulating 2 site(s) for 1 round(s)" in printed
    assert "pooled held-out perplexity" in done.stdout
    noise = [line for line in printed.splitlines()
             if THIRD_PARTY.search(line) and not OURS.match(line)]
    assert noise == []
