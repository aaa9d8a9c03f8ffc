"""Generation-based task evaluation: answer held-out questions greedily and score them.

Deterministic for a seed (a seeded sample of questions, greedy decoding), bounded in time
(``max_questions``, batched, ``max_new_tokens``). ICD-10 questions are scored by their task
(:mod:`fed_llama.evaluation.scoring`); other data by exact match and token F1.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from fed_llama.config.train import QUESTION_TASK
from fed_llama.data.records import Example
from fed_llama.evaluation.scoring import score

GENERIC = QUESTION_TASK  # a question without a task of its own


@dataclass(frozen=True)
class TaskReport:
    """Mean scores per task over the questions asked, and a few examples to look at."""

    metrics: dict[str, dict[str, float]]
    """task -> metric -> mean, plus ``n`` (questions of that task)."""
    samples: list[dict[str, str]]

    def flat(self) -> dict[str, float]:
        """``task/metric`` -> value, for metric tables and CSV."""
        return {f"{task}/{name}": value for task, m in self.metrics.items()
                for name, value in m.items()}


def choose_questions(examples: list[Example], max_questions: int, seed: int,
                     tasks: tuple[str, ...] | None = None) -> list[Example]:
    """A seeded sample of at most ``max_questions`` per task (``tasks``: only those)."""
    by_task: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        task = str(ex.meta.get("task", GENERIC))
        if tasks is None or task in tasks:
            by_task[task].append(ex)
    rng = random.Random(seed)
    chosen: list[Example] = []
    for task in sorted(by_task):
        items = by_task[task]
        chosen += items if len(items) <= max_questions else rng.sample(items, max_questions)
    return chosen


def generate_answers(model: Any, tokenizer: Any, questions: list[Example], *,
                     batch_size: int = 16, max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to each example's prompt, batched with left padding."""
    import torch

    prompts = [tokenizer.apply_chat_template(list(ex.prompt), tokenize=False,
                                             add_generation_prompt=True) for ex in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths
    answers = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     temperature=None, top_p=None, top_k=None,
                                     eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate_tasks(model: Any, tokenizer: Any, examples: list[Example], *,
                   max_questions: int = 64, seed: int = 0, batch_size: int = 16,
                   max_new_tokens: int = 32, tasks: tuple[str, ...] | None = None
                   ) -> TaskReport:
    """Ask up to ``max_questions`` per task, greedily, and average the scores per task."""
    questions = choose_questions(examples, max_questions, seed, tasks)
    answers = generate_answers(model, tokenizer, questions, batch_size=batch_size,
                               max_new_tokens=max_new_tokens)
    return score_answers(questions, answers)


def score_answers(questions: list[Example], answers: list[str]) -> TaskReport:
    """Score each answer against its question's reference and average per task."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    samples: list[dict[str, str]] = []
    for ex, answer in zip(questions, answers, strict=True):
        task = str(ex.meta.get("task", GENERIC))
        sums[task]["n"] += 1
        for name, value in score(task, answer, ex.answer).items():
            sums[task][name] += value
        if len(samples) < 5:
            samples.append({"question": ex.prompt[-1]["content"], "reference": ex.answer,
                            "answer": answer})
    metrics = {task: {name: (v if name == "n" else v / m["n"]) for name, v in m.items()}
               for task, m in sums.items()}
    return TaskReport(metrics=metrics, samples=samples)
