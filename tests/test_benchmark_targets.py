"""The federated-vs-local benchmark's targets, worked by hand (the numbers the README's claims
about the federation and task-evaluation issues rest on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import load_benchmark

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
_module = load_benchmark("federated_vs_local")
references, targets = _module.references, _module.targets


def row(variant: str, ppl: float, category: float) -> dict[str, Any]:
    return {"variant": variant, "pooled_ppl": ppl, "pooled_category": category}


ROWS = [row("base", 140.0, 0.0), row("local:a", 10.0, 0.1), row("local:b", 8.0, 0.2),
        row("centralized", 4.0, 0.5), row("federated:good", 4.3, 0.48),
        row("federated:poor", 9.0, 0.3)]


def test_references_are_centralized_and_the_best_local_on_each_measure() -> None:
    central, best_ppl, best_category = references(ROWS) or (None, 0.0, 0.0)
    assert central == row("centralized", 4.0, 0.5)
    assert best_ppl == 8.0  # local:b, the lower perplexity
    assert best_category == 0.2  # local:b, the higher accuracy


def test_a_federated_row_meeting_every_target() -> None:
    assert targets(ROWS)[0] == {
        "variant": "federated:good",
        "beats_every_local_ppl": True,  # 4.3 < 8
        "ppl_vs_centralized": 1.075,  # 4.3 / 4
        "within_10pct_of_centralized": True,  # 4.3 <= 4.4
        "category_vs_centralized": 0.96,  # 0.48 / 0.5 >= 0.95
        "category_points_over_best_local": 28.0,  # 100 * (0.48 - 0.2) >= 20
    }


def test_a_federated_row_missing_every_target() -> None:
    assert targets(ROWS)[1] == {
        "variant": "federated:poor",
        "beats_every_local_ppl": False,  # 9 > 8
        "ppl_vs_centralized": 2.25,
        "within_10pct_of_centralized": False,
        "category_vs_centralized": 0.6,  # 0.3 / 0.5
        "category_points_over_best_local": 10.0,  # 100 * (0.3 - 0.2)
    }


@pytest.mark.parametrize("missing", ["centralized", "local:"])
def test_no_targets_without_centralized_or_local_rows(missing: str) -> None:
    """Under --skip the table has nothing to compare with, so it claims nothing."""
    rows = [r for r in ROWS if not r["variant"].startswith(missing)]
    assert references(rows) is None
    assert targets(rows) == []


@pytest.mark.parametrize("name", ["federated_vs_local_3rounds.json",
                                  "federated_vs_local_10rounds.json",
                                  "federated_vs_local_15rounds.json"])
def test_saved_results_carry_the_targets_of_their_rows(name: str) -> None:
    """Every committed result file's targets are what its own rows give."""
    saved = json.loads((BENCHMARKS / "results" / name).read_text())
    assert saved["targets"] == targets(saved["rows"])


def test_the_methods_benchmark_keeps_the_stages_whose_settings_did_not_change() -> None:
    resumable = load_benchmark("methods").resumable
    setup = {"site": "cardiology", "steps": 200, "fed_rounds": 2, "fed_questions": 8}

    def saved(**changed: Any) -> dict[str, Any]:
        return {"setup": {**setup, **changed},
                "methods": {"v1": {"sweep": {"lr": 0.02}, "site": {"reduction": 0.95},
                                   "federation": {"fed_ppl": 9.0}}}}

    assert resumable(saved(), setup)["v1"]["federation"] == {"fed_ppl": 9.0}
    # a federation setting changed: its stage is measured again, the others are kept
    assert resumable(saved(fed_questions=32), setup) == {
        "v1": {"sweep": {"lr": 0.02}, "site": {"reduction": 0.95}}}
    # a file written before the federation stage had a setting of its own
    old = saved()
    del old["setup"]["fed_questions"]
    assert "federation" not in resumable(old, setup)["v1"]
    # a site setting changed: nothing is kept
    assert resumable(saved(steps=100), setup) == {}
    assert resumable({}, setup) == {}
