"""What a site does in a federation round, without Flower: train on, or evaluate, an adapter.

A process keeps one backbone with the scenario's adapter method attached (loading it is the slow
part) and each site's encoded data; every round starts by loading the global adapter's weights,
so sites served by the same process never see each other's state.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from fed_llama import wire
from fed_llama.adapter.rank import change_rank
from fed_llama.adapter.state import State
from fed_llama.backbone.cache import cache_root
from fed_llama.backbone.load import WEIGHT_SUFFIXES
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.data import encoded_cache
from fed_llama.data.site_examples import site_examples
from fed_llama.data.source import SiteData, encode_site, sample
from fed_llama.training.loop import train_adapter
from fed_llama.training.lora import adapter_state, load_adapter_state, use_rank
from fed_llama.training.loss import heldout_loss
from fed_llama.training.method import load_method_state, method_state
from fed_llama.training.site_model import loaded_site_model

log = logging.getLogger(__name__)


def site_data(scenario: ScenarioConfig, site: int) -> SiteData:
    """Site ``site``'s encoded data (its source, or its share of a Dirichlet partition), from
    this process's memory, else from the encoded-data cache on disk
    (:mod:`fed_llama.data.encoded_cache`), else read and encoded (and then kept in both)."""
    loaded = loaded_site_model(scenario)
    if site not in loaded.data:
        data, fed, seed = scenario.data, scenario.federation, scenario.train.seed
        model_dir = loaded.backbone.source.model_dir
        tokenizer_files = [p for p in model_dir.iterdir()
                           if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)]

        def current_key() -> str | None:
            ident = encoded_cache.identity(data, fed, site, seed, tokenizer_files)
            return None if ident is None else encoded_cache.cache_key(ident)

        folder, key = cache_root() / "data", current_key()
        encoded = encoded_cache.read(folder, key) if key is not None else None
        if encoded is None:
            encoded = encode_site(site_examples(data, fed, site, seed), data, loaded.tokenizer)
            if key is not None and current_key() == key:  # no file changed while reading
                encoded_cache.write(folder, key, encoded)
        if "categories" in encoded.summary:  # a Dirichlet partition's share
            log.info("site %s: %s", scenario.site_names()[site], encoded.summary["categories"])
        loaded.data[site] = encoded
    return loaded.data[site]


def proximal_term(model: Any, mu: float) -> Callable[[Any], Any]:
    """FedProx's ``mu/2 · ‖w - w_global‖²`` over the trainable adapter weights, with
    ``w_global`` the weights as they are now (just after loading the global adapter)."""
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def term(_model: Any) -> Any:
        return 0.5 * mu * sum(((p - p0) ** 2).sum() for p, p0 in anchors)

    return term


def fit(scenario: ScenarioConfig, site: int, state: State, server_round: int,
        progress: bool = False, proximal_mu: float = 0.0, optimizer: State | None = None
        ) -> tuple[State, dict[str, float], State]:
    """Train the global adapter ``state`` on site ``site`` for the local steps of a round
    (with FedProx's proximal term when ``proximal_mu`` > 0).

    Returns the site's new adapter, its metrics and, with ``federation.local_optimizer =
    "keep"``, its AdamW state after the round (else empty), which the site passes back as
    ``optimizer`` next round to continue it. That state stays at the site.
    """
    if scenario.site_names()[site] in scenario.attack.drop_sites:  # a simulated dropout
        raise RuntimeError(f"site {scenario.site_names()[site]} drops out of round "
                           f"{server_round} ([attack] drop_sites)")
    start = time.perf_counter()
    loaded = loaded_site_model(scenario)
    data = site_data(scenario, site)
    load_seconds = time.perf_counter() - start
    rank, lora = scenario.site_rank(site), scenario.lora
    if scenario.method == "lora":
        adapter = use_rank(loaded.model, lora, rank, scenario.train.seed)
        if rank != lora.r:  # the global adapter re-factorized to this site's rank
            fill = loaded.fills.setdefault(rank, adapter_state(loaded.model, adapter))
            state = change_rank(state, scale=lora.alpha / lora.r, rank=rank,
                                new_scale=lora.alpha / rank, fill=fill)
        load_adapter_state(loaded.model, state, adapter)
        ffa = scenario.federation.aggregation == "ffa"
        for name, param in loaded.model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(f".{adapter}." in name and not (ffa and "lora_A" in name))
    else:  # every other method: one shape, every declared tensor trains
        load_method_state(loaded.model, scenario.method, state)
    cfg = dataclasses.replace(scenario.train, seed=scenario.train.seed + 1000 * server_round
                              + site)
    proximal = proximal_term(loaded.model, proximal_mu) if proximal_mu > 0 else None
    fed, steps = scenario.federation, cfg.max_steps
    schedule = None
    if fed.lr_schedule == "across-rounds":  # round k: steps (k-1)·S .. k·S-1 of one schedule
        done = min(max(server_round, 1), fed.rounds) - 1
        schedule = (done * steps, fed.rounds * steps)
    keep = fed.local_optimizer == "keep"
    stats = train_adapter(loaded.model, data.train, cfg, loaded.tokenizer.pad_token_id,
                          proximal=proximal, progress=progress, schedule=schedule,
                          desc=f"site {site} round {server_round}",
                          resume_optimizer=optimizer if keep else None, keep_optimizer=keep)
    tail = stats.losses[-max(1, len(stats.losses) // 4):]
    metrics = {"num-examples": float(len(data.train)), "train-loss": sum(tail) / len(tail),
               "train-seconds": stats.seconds, "train-tokens": float(stats.tokens),
               wire.LOAD_SECONDS: load_seconds}
    if scenario.method == "lora":  # the LoRA rank this site trained
        metrics["rank"] = float(rank)
    if keep:  # how many steps the site's AdamW moments have accumulated, this round included
        metrics["optimizer-steps"] = float(stats.optimizer_state.get("step", 0.0))
    new_state = (adapter_state(loaded.model, adapter) if scenario.method == "lora"
                 else method_state(loaded.model, scenario.method))
    attack = scenario.attack
    if scenario.site_names()[site] in attack.poison_sites:  # a simulated hostile site
        log.warning("site %s poisons its round %d update ([attack]: change x %g)",
                    scenario.site_names()[site], server_round, attack.poison_scale)
        new_state = {k: state[k] + attack.poison_scale * (v - state[k])
                     for k, v in new_state.items()}
    if scenario.method == "lora":  # evaluation uses the global rank
        use_rank(loaded.model, lora, lora.r, scenario.train.seed)
    delay = attack.slow(scenario.site_names()[site], server_round)
    if delay:  # a simulated straggler
        log.warning("site %s replies %g s late in round %d ([attack] slow_sites)",
                    scenario.site_names()[site], delay, server_round)
        time.sleep(delay)
    return new_state, metrics, stats.optimizer_state


def evaluate(scenario: ScenarioConfig, site: int, state: State) -> dict[str, float]:
    """Held-out answer loss of the adapter ``state`` on site ``site``."""
    begin = time.perf_counter()
    loaded = loaded_site_model(scenario)
    data = site_data(scenario, site)
    start = time.perf_counter()  # the evaluation itself, as train-seconds is the training
    if scenario.method == "lora":
        use_rank(loaded.model, scenario.lora, scenario.lora.r, scenario.train.seed)
    load_method_state(loaded.model, scenario.method, state)
    ev = scenario.evaluation
    result = heldout_loss(loaded.model, sample(data.heldout, ev.perplexity_records,
                                               scenario.train.seed),
                          scenario.train.eval_batch_size, loaded.tokenizer.pad_token_id)
    metrics = {"num-examples": float(result.examples), "heldout-loss": result.loss,
               "heldout-tokens": float(result.tokens)}
    if ev.questions:
        from fed_llama.evaluation.tasks import evaluate_tasks

        loaded.model.eval()
        report = evaluate_tasks(loaded.model, loaded.tokenizer, data.heldout_examples,
                                max_questions=ev.questions, seed=scenario.train.seed,
                                batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                                tasks=ev.tasks or None)
        metrics.update({f"task/{k}": v for k, v in report.flat().items()})
    metrics[wire.EVALUATE_SECONDS] = time.perf_counter() - start
    metrics[wire.LOAD_SECONDS] = start - begin
    return metrics
