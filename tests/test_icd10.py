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


def test_chapter_code_answers_name_the_chapter_then_the_code_and_score_by_the_code() -> None:
    from fed_llama.config import DataConfig
    from fed_llama.data.source import load_examples
    from fed_llama.evaluation.scoring import code_scores

    plain = icd10.site_split("cardiology", seed=0)
    named = icd10.site_split("cardiology", seed=0, answer="chapter-code")
    nstemi = next(ex for ex in named.train
                  if ex.meta == {"code": "I21.4", "task": "desc2code", "site": "cardiology"})
    assert nstemi.answer == "Diseases of the circulatory system: I21.4"
    assert icd10.chapter_title("oncology") == "Neoplasms"
    # the same questions and split; only the description -> code answers differ
    assert [ex.prompt for ex in named.heldout] == [ex.prompt for ex in plain.heldout]
    assert all((a.answer == b.answer) == (a.meta["task"] != "desc2code")
               for a, b in zip(named.train, plain.train, strict=True))
    # a model that answers in the new format is scored on the code it names
    assert code_scores("Diseases of the circulatory system: I21.9", nstemi.answer) == {
        "exact": 0.0, "category": 1.0, "chapter": 1.0}
    loaded = load_examples(DataConfig(source="icd10:cardiology", icd10_answers="chapter-code"),
                           seed=0)
    assert [ex.answer for ex in loaded.train[:4]] == [ex.answer for ex in named.train[:4]]
    with pytest.raises(DataError, match="unknown ICD-10 answer format 'letters'"):
        icd10.site_split("cardiology", answer="letters")


def test_a_site_can_train_on_some_question_kinds_and_still_be_evaluated_on_all() -> None:
    """``data.icd10_train_tasks`` narrows the training set to the named question kinds; the
    held-out set is the same as with every kind, so scores stay comparable."""
    from fed_llama.config import DataConfig
    from fed_llama.config.train import ICD10_TASKS
    from fed_llama.data.source import load_examples

    every = load_examples(DataConfig(source="icd10:cardiology", max_heldout_records=0), seed=0)
    codes_only = load_examples(DataConfig(source="icd10:cardiology", max_heldout_records=0,
                                          icd10_train_tasks=("desc2code",)), seed=0)
    assert codes_only.train == [ex for ex in every.train if ex.meta["task"] == "desc2code"]
    assert 0 < len(codes_only.train) < len(every.train)
    assert codes_only.heldout == every.heldout
    assert {ex.meta["task"] for ex in codes_only.heldout} == set(ICD10_TASKS)
    assert DataConfig(icd10_train_tasks=("desc2code", "diagnoses")).problems() == [
        "icd10_train_tasks must name one or more of desc2code, code2desc, includes, excludes; "
        "got ['desc2code', 'diagnoses']"]
    assert DataConfig(icd10_train_tasks=()).problems()
