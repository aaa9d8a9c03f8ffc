"""The built-in ICD-10-CM hospital sites."""

from __future__ import annotations

import pytest

from fed_llama.cli.main import main
from fed_llama.data import icd10, read_jsonl
from fed_llama.errors import DataError


def test_cardiology_is_the_circulatory_chapter() -> None:
    codes = icd10.chapter_codes(icd10.SITES["cardiology"][0])
    assert len(codes) == 1798
    assert all(c.code.startswith("I") for c in codes)
    nstemi = next(c for c in codes if c.code == "I21.4")
    assert nstemi.description == "Non-ST elevation (NSTEMI) myocardial infarction"
    assert "Non-Q wave myocardial infarction NOS" in nstemi.includes


def test_a_code_yields_its_four_kinds_of_question() -> None:
    code = icd10.Code("X00.1", "Something", ("a", "b"), ("c",), ("d",))
    qs = icd10.questions(code, "test")
    assert [q.meta["task"] for q in qs] == list(icd10.TASKS)
    assert qs[0].answer == "X00.1" and qs[1].answer == "Something"
    assert qs[2].answer == "a; b" and qs[3].answer == "Excludes1: c. Excludes2: d"


def test_heldout_codes_are_never_seen_in_training() -> None:
    split = icd10.site_split("psychiatry", seed=0)
    train_codes = {ex.meta["code"] for ex in split.train}
    held_codes = {ex.meta["code"] for ex in split.heldout}
    assert held_codes and train_codes.isdisjoint(held_codes)
    assert len(held_codes) == split.num_heldout_codes
    assert 0.07 < split.num_heldout_codes / split.num_codes < 0.13
    assert icd10.site_split("psychiatry", seed=1).heldout != split.heldout


def test_unknown_site_lists_the_sites() -> None:
    with pytest.raises(DataError,
                       match=r"unknown ICD-10 site 'cardio': choose one of .*cardiology"):
        icd10.site_split("cardio")


def test_cli_writes_train_and_heldout_files(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    assert main(["data", "icd10", "--site", "neonatology", "--out", str(out),
                 "--heldout", str(held)]) == 0
    train_examples = read_jsonl(out).examples
    held_examples = read_jsonl(held).examples
    assert {e.meta["code"] for e in train_examples}.isdisjoint(
        {e.meta["code"] for e in held_examples})
    assert "training records" in capsys.readouterr().out
