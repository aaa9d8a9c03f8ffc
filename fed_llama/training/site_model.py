"""A process's backbone with the scenario's adapter attached, loaded once, and the adapter's
initial state: what the sites train and the aggregator's round 1 starts from.

Loading the backbone is the slow part of a round, so a process (a simulation's worker, a
SuperNode's ClientApp, the aggregator) keeps one per scenario. The aggregator needs only the
seeded initial adapter (:func:`initial_state`), which every site attaches identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fed_llama.adapter.state import State
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.data.source import SiteData
from fed_llama.training.method import attach_method, method_state


@dataclass
class LoadedSite:
    model: Any
    tokenizer: Any
    backbone: Any
    data: dict[int, SiteData]
    initial: State
    """The adapter as attached (seeded initialization: LoRA's B = 0, every other method's
    gates at 0), before any training."""
    fills: dict[int, State] = field(default_factory=dict)
    """Per rank other than the global one: the seeded initial adapter whose A rows fill
    directions the global product lacks (see :func:`fed_llama.adapter.rank.factorize`)."""


_CACHE: dict[ScenarioConfig, LoadedSite] = {}


def loaded_site_model(scenario: ScenarioConfig) -> LoadedSite:
    """This process's backbone with the scenario's adapter method attached (loaded on first
    use)."""
    if scenario not in _CACHE:
        from fed_llama.backbone.load import load_backbone

        bb = load_backbone(scenario.backbone)
        model = attach_method(bb.model, scenario, seed=scenario.train.seed)
        _CACHE.clear()  # one scenario per process at a time: free the previous backbone
        _CACHE[scenario] = LoadedSite(model=model, tokenizer=bb.tokenizer, backbone=bb, data={},
                                      initial=method_state(model, scenario.method))
    return _CACHE[scenario]


def initial_state(scenario: ScenarioConfig) -> State:
    """The global adapter before round 1: the method's seeded initialization (LoRA: B = 0).

    Every site attaches its adapter with the same seed, so with FFA-LoRA every site's frozen A
    equals this A. Always the attached state, however the process's model was trained since
    (a copy: callers may change it).
    """
    return {k: v.clone() for k, v in loaded_site_model(scenario).initial.items()}
