"""Scorers against hand-worked examples."""

from __future__ import annotations

import pytest

from fed_llama.evaluation.scoring import code_scores, extract_code, score, token_f1


@pytest.mark.parametrize("text, code", [
    ("I21.4", "I21.4"),
    ("The code is i21.4.", "I21.4"),
    ("I10<|im_end|>", "I10"),
    ("O9A.11 then I10", "O9A.11"),
    ("", ""),
    ("no code here, sorry", ""),
    ("1234.5", ""),
])
def test_extract_code(text: str, code: str) -> None:
    assert extract_code(text) == code


def test_code_levels() -> None:
    assert code_scores("I21.4", "I21.4") == {"exact": 1.0, "category": 1.0, "chapter": 1.0}
    assert code_scores("I21.9", "I21.4") == {"exact": 0.0, "category": 1.0, "chapter": 1.0}
    assert code_scores("I25.10", "I21.4") == {"exact": 0.0, "category": 0.0, "chapter": 1.0}
    assert code_scores("C50.9", "I21.4") == {"exact": 0.0, "category": 0.0, "chapter": 0.0}
    assert code_scores("I21", "I21.4") == {"exact": 0.0, "category": 1.0, "chapter": 1.0}


@pytest.mark.parametrize("generation", ["", "   ", "I don't know", "<|im_end|>", "\x00\ufffd"])
def test_empty_and_malformed_generations_score_zero(generation: str) -> None:
    assert code_scores(generation, "I21.4") == {"exact": 0.0, "category": 0.0, "chapter": 0.0}
    assert score("code2desc", generation, "Essential hypertension")["f1"] == 0.0


def test_token_f1_by_hand() -> None:
    # prediction 4 tokens, reference 3 ("the" dropped), 2 in common: P=2/4, R=2/3 -> F1=4/7
    assert token_f1("acute myocardial infarction unspecified", "The acute infarction, of") \
        == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert token_f1("Essential (primary) hypertension", "essential primary hypertension") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("x", "y") == 0.0


def test_free_text_task_scores_exact_and_f1() -> None:
    assert score("code2desc", "Essential hypertension.", "essential hypertension") == \
        {"exact": 1.0, "f1": 1.0}
    assert score("answer", "Paris", "Lyon") == {"exact": 0.0, "f1": 0.0}


def test_task_evaluation_is_deterministic_and_bounded(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    from fed_llama.backbone import load_backbone
    from fed_llama.config import BackboneConfig
    from fed_llama.data.icd10 import Code, questions
    from fed_llama.evaluation.tasks import evaluate_tasks

    bb = load_backbone(BackboneConfig(name=str(tiny_backbone)))
    examples = [q for i in range(12) for q in questions(
        Code(f"I{10 + i}.{i}", f"disease {i}", (), (), ()), "cardiology")]
    first = evaluate_tasks(bb.model, bb.tokenizer, examples, max_questions=5, max_new_tokens=4)
    again = evaluate_tasks(bb.model, bb.tokenizer, examples, max_questions=5, max_new_tokens=4)
    assert first == again
    assert set(first.metrics) == {"desc2code", "code2desc"}
    assert first.metrics["desc2code"]["n"] == 5 and first.metrics["code2desc"]["n"] == 5
    assert set(first.metrics["desc2code"]) == {"n", "exact", "category", "chapter"}
    assert all(0.0 <= v <= 1.0 for k, v in first.flat().items() if not k.endswith("/n"))
