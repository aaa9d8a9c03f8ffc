"""benchmarks/methods.py's bookkeeping: a run bounded by --budget-minutes stops before a piece
that would end past it, and the same command run again measures the rest; every piece records
its minutes and the run that measured it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import load_benchmark


class Clock:
    """A fake ``time.perf_counter``: each measured piece takes the minutes it is told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(methods: Any, clock: Clock, json_path: Path, *extra: str,
         monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def piece(stage: str, minutes: float, value: dict[str, Any]) -> Any:
        def fake(method: str, *args: Any) -> dict[str, Any]:
            calls.append(f"{method} {stage}")
            clock.now += 60 * minutes
            return dict(value)
        return fake

    monkeypatch.setattr(methods, "sweep", piece("sweep", 9, {"validation_ppl_by_lr": {"0.01": 5.0},
                                                              "lr": 0.01}))
    monkeypatch.setattr(methods, "site", piece("site", 12, {"reduction": 0.9}))
    monkeypatch.setattr(methods, "federation", piece("federation", 21, {"fed_ppl": 10.0}))
    monkeypatch.setattr(methods.time, "perf_counter", clock)
    monkeypatch.setattr(sys, "argv", ["methods.py", "--methods", "lora", "excitor",
                                      "--json", str(json_path), *extra])
    methods.main()
    return calls


def test_a_budgeted_run_stops_before_the_piece_that_would_overrun_and_the_next_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    methods = load_benchmark("methods")
    out = tmp_path / "methods.json"
    # 9 + 12 + 21 = 42 minutes per method: a 50-minute budget holds lora's three pieces only
    first = _run(methods, Clock(), out, "--budget-minutes", "50", monkeypatch=monkeypatch)
    assert first == ["lora sweep", "lora site", "lora federation"]
    said = capsys.readouterr().out
    assert "not measured yet: excitor sweep, excitor site, excitor federation" in said
    saved = json.loads(out.read_text())
    assert saved["methods"]["lora"]["minutes"] == {"sweep": 9.0, "site": 12.0,
                                                   "federation": 21.0}
    assert set(saved["methods"]["excitor"]) == {"method"}  # nothing of it measured yet

    second = _run(methods, Clock(), out, "--budget-minutes", "50", monkeypatch=monkeypatch)
    assert second == ["excitor sweep", "excitor site", "excitor federation"]
    saved = json.loads(out.read_text())
    assert {m: r["sweep"]["lr"] for m, r in saved["methods"].items()} == {"lora": 0.01,
                                                                         "excitor": 0.01}
    # each stage names the runs that measured it, and for which methods
    for stage in ("sweep", "site", "federation"):
        assert sorted(m for ms in saved["stages_measured"][stage].values() for m in ms) == [
            "excitor", "lora"]


def test_the_first_piece_runs_even_when_it_alone_exceeds_the_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    methods = load_benchmark("methods")
    calls = _run(methods, Clock(), tmp_path / "m.json", "--budget-minutes", "1",
                 monkeypatch=monkeypatch)
    assert calls == ["lora sweep"]  # a budget below any piece still makes progress
