"""The local training loop: AdamW, warm-up + cosine, accumulation, clipping, progress bar."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fed_llama.config.train import OptimConfig
from fed_llama.data.batching import batch_order, collate
from fed_llama.data.tokenize import IGNORE, Encoded
from fed_llama.training.lora import named_trainable_parameters, trainable_parameters
from fed_llama.training.loss import answer_token_nll, example_mean_nll

log = logging.getLogger(__name__)

MIN_LR_RATIO = 0.1


@dataclass
class TrainStats:
    """What a training run did."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    """Non-padding tokens processed (prompt and answer)."""
    answer_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    """Mean answer-token loss of each optimizer step."""
    lrs: list[float] = field(default_factory=list)
    """Learning rate of each optimizer step."""
    stopped_by_time: bool = False
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """AdamW's moments and step count after the last step, by parameter name (only when
    ``train_adapter`` was asked to keep them): see :func:`optimizer_state`."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 2), "tokens": self.tokens,
                "answer_tokens": self.answer_tokens,
                "tokens_per_second": round(self.tokens_per_second, 1),
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None,
                "losses": [round(x, 4) for x in self.losses],
                "stopped_by_time": self.stopped_by_time}


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to ``MIN_LR_RATIO`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter moments, as torch names them."""
STEP = "step"


def optimizer_state(optim: torch.optim.Optimizer, model: Any) -> dict[str, torch.Tensor]:
    """AdamW's state as flat tensors: ``exp_avg/<param>``, ``exp_avg_sq/<param>`` for every
    trainable parameter (by its name in ``model``) and ``step``, the steps taken so far."""
    out: dict[str, torch.Tensor] = {}
    steps = set()
    for name, param in named_trainable_parameters(model).items():
        slot = optim.state.get(param, {})
        if not slot:
            continue
        for moment in MOMENTS:
            out[f"{moment}/{name}"] = slot[moment].detach().cpu().clone()
        steps.add(float(slot[STEP]))
    if len(steps) > 1:
        raise RuntimeError(f"AdamW's parameters took different numbers of steps: {steps}")
    if steps:
        out[STEP] = torch.tensor(steps.pop())
    return out


def _restore_optimizer(optim: torch.optim.Optimizer, model: Any,
                       saved: dict[str, torch.Tensor]) -> None:
    """Put :func:`optimizer_state`'s tensors back into a fresh AdamW over ``model``'s
    trainable parameters; refuses a state saved for other parameters."""
    params = named_trainable_parameters(model)
    names = {k.partition("/")[2] for k in saved if k != STEP}
    if STEP not in saved or names != set(params) or len(saved) != 2 * len(params) + 1:
        missing, extra = sorted(set(params) - names), sorted(names - set(params))
        raise ValueError(f"the optimizer state does not fit the adapter's trainable "
                         f"parameters (missing {missing[:2]}, unknown {extra[:2]}, step "
                         f"{'present' if STEP in saved else 'missing'})")
    for name, param in params.items():
        for moment in MOMENTS:
            if saved[f"{moment}/{name}"].shape != param.shape:
                raise ValueError(f"the optimizer state's {moment} of {name} has shape "
                                 f"{tuple(saved[f'{moment}/{name}'].shape)}, the parameter "
                                 f"{tuple(param.shape)}")
        optim.state[param] = {
            STEP: saved[STEP].detach().clone().to(torch.float32),
            **{m: saved[f"{m}/{name}"].detach().clone().to(param.dtype) for m in MOMENTS}}


def checkpoint_activations(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (transformers' gradient checkpointing, non-reentrant: the frozen embeddings need no
    gradient, and dropout draws the same masks again)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support activation checkpointing: "
                         "set train.activation_checkpointing = false")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train_adapter(model: Any, items: list[Encoded], cfg: OptimConfig, pad_id: int, *,
                  proximal: Any = None, progress: bool = True, desc: str = "train",
                  schedule: tuple[int, int] | None = None,
                  resume_optimizer: dict[str, torch.Tensor] | None = None,
                  keep_optimizer: bool = False) -> TrainStats:
    """Train the adapter of ``model`` on ``items`` for ``cfg.max_steps`` optimizer steps.

    ``proximal``, if given, is called with the model and returns a loss term added to each
    step's loss (FedProx's proximal term). ``schedule = (offset, total)`` places these steps
    at ``offset`` of a learning-rate schedule ``total`` steps long (a federation round's
    share of one schedule across all rounds); None: one schedule over ``cfg.max_steps``.
    ``resume_optimizer`` (from an earlier run's ``TrainStats.optimizer_state``) continues
    AdamW's moments instead of starting them at zero; ``keep_optimizer`` fills
    ``TrainStats.optimizer_state`` at the end.
    """
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    params = trainable_parameters(model)
    if not params:
        raise RuntimeError("the model has no trainable parameters: attach an adapter first")
    if cfg.activation_checkpointing:
        checkpoint_activations(model)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume_optimizer:
        _restore_optimizer(optim, model, resume_optimizer)
    offset, total = schedule or (0, cfg.max_steps)
    if offset < 0 or total < offset + 1:
        raise ValueError(f"schedule {schedule}: need 0 <= offset < total")
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: lr_lambda(offset + s, cfg.warmup_steps, total))
    order = batch_order([len(x.input_ids) for x in items], cfg.batch_size, cfg.seed,
                        cfg.group_by_length)
    stats = TrainStats()
    model.train()
    start = time.perf_counter()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    bar = tqdm(total=cfg.max_steps, desc=desc, unit="step", disable=not progress, leave=False)
    try:
        for _ in range(cfg.max_steps):
            micro = [collate([items[i] for i in next(order)], pad_id)
                     for _ in range(cfg.grad_accum)]
            answered = [(b["labels"][:, 1:] != IGNORE) for b in micro]
            n_answer = sum(int(a.sum()) for a in answered)
            n_examples = sum(int(a.any(dim=1).sum()) for a in answered)
            step_loss = 0.0
            for batch in micro:
                token_nll, rows = answer_token_nll(model, batch)
                nll = token_nll.sum()
                if cfg.loss_average == "examples":
                    loss = example_mean_nll(token_nll, rows, len(batch["labels"])) / max(
                        n_examples, 1)
                else:
                    loss = nll / max(n_answer, 1)
                if proximal is not None:
                    loss = loss + proximal(model) / cfg.grad_accum
                loss.backward()
                step_loss += nll.item()
                stats.tokens += int(batch["attention_mask"].sum())
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            stats.lrs.append(float(sched.get_last_lr()[0]))
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            stats.steps += 1
            stats.answer_tokens += n_answer
            stats.losses.append(step_loss / max(n_answer, 1))
            stats.seconds = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{stats.losses[-1]:.3f}", tok_s=f"{stats.tokens_per_second:.0f}",
                            lr=f"{sched.get_last_lr()[0]:.1e}")
            if time.perf_counter() > deadline:
                stats.stopped_by_time = True
                log.warning("stopping after %d steps: train.max_minutes=%s reached",
                            stats.steps, cfg.max_minutes)
                break
    finally:
        bar.close()
        model.eval()
    if keep_optimizer:
        stats.optimizer_state = optimizer_state(optim, model)
    return stats
