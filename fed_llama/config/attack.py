"""Simulated faults and hostile sites of a scenario ([attack]): for robustness experiments and
the Deployment Engine drills; empty in real use."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AttackConfig:
    """Simulated hostile sites, for robustness experiments ([attack]); leave empty in real use."""

    poison_sites: tuple[str, ...] = ()
    """Sites (by name, e.g. ``oncology``) that poison every update they send: the global
    adapter plus ``poison_scale`` times their honest change (a boosted, model-replacement
    style update). It still travels signed and encrypted, as a compromised site's would."""

    poison_scale: float = 100.0
    """How much a poisoning site boosts its change."""

    drop_sites: tuple[str, ...] = ()
    """Sites that fail in every round's training (a site dropping out): the round goes on
    without them when ``federation.min_sites`` (or SecAgg+'s threshold) allows."""

    slow_sites: tuple[str, ...] = ()
    """Sites that reply late (stragglers): after training they wait ``slow_seconds`` before
    replying, in the rounds ``slow_rounds`` names (all rounds when empty)."""

    slow_seconds: float = 0.0
    """How long a slow site waits after training before it replies."""

    slow_rounds: tuple[int, ...] = ()
    """The rounds a slow site is slow in; empty: every round."""

    def problems(self) -> list[str]:
        out = []
        if self.poison_sites and not math.isfinite(self.poison_scale):
            out.append(f"poison_scale must be a finite number; got {self.poison_scale}")
        if self.slow_sites and not (math.isfinite(self.slow_seconds) and self.slow_seconds > 0):
            out.append(f"slow_seconds must be a positive number of seconds with slow_sites; "
                       f"got {self.slow_seconds}")
        if any(r < 1 for r in self.slow_rounds):
            out.append(f"slow_rounds are round numbers from 1; got {list(self.slow_rounds)}")
        return out

    def slow(self, site: str, server_round: int) -> float:
        """Seconds ``site`` waits before replying in ``server_round`` (0: not slow)."""
        if site in self.slow_sites and (not self.slow_rounds or server_round in self.slow_rounds):
            return self.slow_seconds
        return 0.0
