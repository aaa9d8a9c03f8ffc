"""Configuration of a site's local training run (``fed-llama train``).

Every default works on the default backbone; ``client/site.toml`` is the annotated template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fed_llama.config.adapter import ATTENTION_MODULES, MLP_MODULES, LoraConfig, MethodSections

__all__ = ["ATTENTION_MODULES", "ICD10_PREFIX", "ICD10_TASKS", "MLP_MODULES", "QUESTION_TASK",
           "BackboneConfig", "DataConfig", "LoraConfig", "OptimConfig", "TrainConfig"]

ICD10_PREFIX = "icd10:"
ICD10_TASKS = ("desc2code", "code2desc", "includes", "excludes")
"""The question kinds an ICD-10 code yields (``fed_llama.data.icd10``)."""
QUESTION_TASK = "answer"
"""The kind of question a JSONL record without a task of its own is scored as."""


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen base model every site shares."""

    name: str = "smollm2-135m"
    """A built-in backbone name (``smollm2-135m``), a local Hugging Face LLaMA directory or a
    ``.gguf`` file."""

    precision: Literal["fp32", "bf16"] = "fp32"
    """Weights and compute dtype; fp32 is the fast and exact choice on CPU."""

    quantization: Literal["none", "nf4"] = "none"
    """``nf4`` loads the frozen backbone in 4-bit NF4 with double quantization (QLoRA)."""

    def problems(self) -> list[str]:
        return [] if self.name.strip() else ["name must not be empty: use 'smollm2-135m'"]


TEMPLATE_SYSTEM_PROMPT = "template"
"""``data.system_prompt`` value that leaves the system message to the chat template."""


@dataclass(frozen=True)
class DataConfig:
    """Where a site's examples come from and how they become tokens."""

    source: str = field(default="icd10:cardiology",
                        metadata={"path": True, "schemes": (ICD10_PREFIX,)})
    """A JSONL file of ``{"instruction", "input", "output"}`` or ``{"messages": [...]}``
    records, or ``icd10:<site>`` for a built-in ICD-10-CM hospital site."""

    heldout: str = field(default="", metadata={"path": True})
    """A held-out JSONL file. Empty: the ICD-10 site's held-out codes, or a seeded
    ``val_fraction`` split of ``source``."""

    val_fraction: float = 0.1
    """Share of ``source`` held out for validation when ``heldout`` is empty (JSONL sources)."""

    max_length: int = 256
    """Tokens per example after the chat template; longer examples are truncated."""

    skip_bad_lines: bool = False
    """Skip malformed JSONL records (and report how many) instead of stopping at the first."""

    max_train_records: int = 0
    """Use at most this many training records (0: all)."""

    max_heldout_records: int = 256
    """Evaluate on at most this many held-out records, a seeded sample (0: all)."""

    icd10_answers: Literal["code", "chapter-code"] = "code"
    """ICD-10 sites only: how a description -> code question is answered. ``code``: the code
    (``I70.435``). ``chapter-code``: the chapter's title, then the code (``Diseases of the
    circulatory system: I70.435``); a language model relates a description to a chapter named
    in words far sooner than to its letter, and the letter follows from the title. Scoring
    reads the first code in an answer either way."""

    icd10_train_tasks: tuple[str, ...] = ICD10_TASKS
    """ICD-10 sites only: the question kinds a site trains on, of ``desc2code``,
    ``code2desc``, ``includes`` and ``excludes``. The held-out set keeps every kind, so
    perplexity and task scores stay comparable between settings."""

    system_prompt: str = TEMPLATE_SYSTEM_PROMPT
    """The system message put before every example that has none, in training and in task
    questions alike. ``"template"``: none is added and the backbone's chat template adds its own
    default (SmolLM2's names the assistant: 16 tokens on every example, a quarter of an ICD-10
    example). Any other text, the empty string included, is used as the system message; an
    adapter trained with one answers best when asked with the same one (docs/edge.md)."""

    @property
    def trained_system_prompt(self) -> str | None:
        """The system message added to examples, as manifests record it (None: the chat
        template's default)."""
        return None if self.system_prompt == TEMPLATE_SYSTEM_PROMPT else self.system_prompt

    def problems(self) -> list[str]:
        out = []
        unknown = [t for t in self.icd10_train_tasks if t not in ICD10_TASKS]
        if unknown or not self.icd10_train_tasks:
            out.append(f"icd10_train_tasks must name one or more of {', '.join(ICD10_TASKS)}; "
                       f"got {list(self.icd10_train_tasks)}")
        if not self.source.strip():
            out.append("source must name a JSONL file or 'icd10:<site>'")
        if not 0.0 < self.val_fraction < 1.0:
            out.append(f"val_fraction must be between 0 and 1 (exclusive); got {self.val_fraction}")
        if self.max_length < 16:
            out.append(f"max_length must be at least 16 tokens; got {self.max_length}")
        if self.max_train_records < 0:
            out.append(f"max_train_records must be 0 (all) or more; got {self.max_train_records}")
        if self.max_heldout_records < 0:
            out.append(
                f"max_heldout_records must be 0 (all) or more; got {self.max_heldout_records}")
        return out


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and the loop."""

    max_steps: int = 200
    """Optimizer steps (each of ``batch_size * grad_accum`` examples)."""

    max_minutes: float = 0.0
    """Stop after this many minutes of training even before ``max_steps`` (0: no limit)."""

    batch_size: int = 8
    """Examples per forward pass."""

    grad_accum: int = 1
    """Forward passes accumulated into one optimizer step."""

    lr: float = 1e-3
    """Peak learning rate of AdamW (after warm-up, then cosine decay to 10% of it)."""

    warmup_steps: int = 10
    """Linear warm-up steps."""

    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""

    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""

    seed: int = 0
    """Seeds data order, the validation split, adapter initialization and dropout."""

    group_by_length: bool = True
    """Batch examples of similar length together so little compute is spent on padding."""

    eval_batch_size: int = 16
    """Examples per forward pass when measuring held-out loss."""

    threads: int = 0
    """CPU threads for torch (0: torch's default)."""

    loss_average: Literal["tokens", "examples"] = "tokens"
    """How a step's loss averages the answer tokens: ``tokens``, one mean over every answer
    token of the step (a 40-token answer weighs 8 times a 5-token one); ``examples``, each
    example's mean over its own answer tokens, then the mean over the examples (short answers,
    such as a code, weigh as much as long ones)."""

    activation_checkpointing: bool = False
    """Keep only each decoder layer's input in the forward pass and recompute the rest in the
    backward pass: less memory for activations, at the cost of a second forward pass through
    each layer (the gradients are the same)."""

    def problems(self) -> list[str]:
        out = []
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "eval_batch_size": self.eval_batch_size}
        out += [f"{k} must be at least 1; got {v}" for k, v in positive.items() if v < 1]
        if self.lr <= 0:
            out.append(f"lr must be positive; got {self.lr}")
        out += self.schedule_problems()
        if self.max_minutes < 0:
            out.append(f"max_minutes must be 0 (no limit) or more; got {self.max_minutes}")
        if self.max_grad_norm < 0:
            out.append(f"max_grad_norm must be 0 (off) or more; got {self.max_grad_norm}")
        if self.weight_decay < 0:
            out.append(f"weight_decay must be 0 or more; got {self.weight_decay}")
        if self.threads < 0:
            out.append(f"threads must be 0 (default) or more; got {self.threads}")
        return out

    def schedule_problems(self) -> list[str]:
        """The warm-up must end within the schedule: here one run of ``max_steps``."""
        if self.max_steps >= 1 and not 0 <= self.warmup_steps < self.max_steps:
            return [f"warmup_steps must be in [0, max_steps={self.max_steps}); "
                    f"got {self.warmup_steps}"]
        return []


@dataclass(frozen=True)
class TrainConfig(MethodSections):
    """A site's local training run: ``fed-llama train CONFIG.toml`` (the adapter method and
    its settings: [adapter] and the method's section, see :mod:`fed_llama.config.adapter`)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The frozen base model ([backbone])."""

    data: DataConfig = field(default_factory=DataConfig)
    """The site's data ([data])."""

    train: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and loop ([train])."""
