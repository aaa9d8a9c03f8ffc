"""A federation scenario: ``fed-llama simulate simulations/<scenario>.toml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fed_llama.config.adapter import MethodSections, lora_only_problems
from fed_llama.config.attack import AttackConfig
from fed_llama.config.security import (
    PrivacyConfig,
    SecureAggregationConfig,
    SecurityConfig,
)
from fed_llama.config.train import (
    ICD10_PREFIX,
    ICD10_TASKS,
    QUESTION_TASK,
    BackboneConfig,
    DataConfig,
    OptimConfig,
)

AGGREGATIONS = ("factors", "exact", "ffa")
SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad", "fedavgm")


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, sites and how their updates are combined."""

    rounds: int = 3
    """Federated rounds; each site trains ``train.max_steps`` local steps per round."""

    sites: tuple[str, ...] = field(
        default=("icd10:cardiology", "icd10:oncology", "icd10:psychiatry"),
        metadata={"path": True, "schemes": (ICD10_PREFIX,)})
    """One data source per site: ``icd10:<site>`` or a JSONL file (relative paths are resolved
    against the scenario file's folder)."""

    aggregation: Literal["factors", "exact", "ffa"] = "factors"
    """``factors``: FedAvg of A and B; ``exact``: mean of B·A re-factorized by SVD; ``ffa``:
    FFA-LoRA, A frozen at a shared seed and only B trained and averaged."""

    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                      "fedavgm"] = "fedavg"
    """Flower's strategy on top of the aggregation: ``fedavg`` (the aggregate is the new
    global adapter), ``fedprox`` (sites add ``proximal_mu``/2·‖w - w_global‖² to their loss),
    or a server optimizer that treats the aggregate's change as a pseudo-gradient
    (``fedadam``, ``fedyogi``, ``fedadagrad`` with ``server_lr``; ``fedavgm`` with
    ``server_lr`` and ``server_momentum``)."""

    participation: Literal["all", "cyclic"] = "all"
    """``all``: every site trains every round from the global adapter and the updates are
    aggregated. ``cyclic`` (cyclic weight transfer): one site per round in site order (round
    k is site (k-1) mod N), continuing from the adapter the previous site returned, so the
    local steps follow one another as in centralized training; ``rounds`` then counts turns
    (N·R turns take the local steps of R rounds of all sites, in N times the wall time)."""

    lr_schedule: Literal["across-rounds", "per-round"] = "across-rounds"
    """``across-rounds``: the local steps of round k are steps (k-1)·S+1 .. k·S of one
    warm-up + cosine schedule over all ``rounds``·S steps (S = ``train.max_steps``), as one
    uninterrupted run would have them. ``per-round``: every round warms up and decays anew
    (the learning rate falls to 10% at the end of each round)."""

    local_optimizer: Literal["restart", "keep"] = "restart"
    """``restart``: every round's local training starts AdamW afresh (zero moments, so its
    first steps move every weight by about the learning rate, whatever its gradient's size).
    ``keep``: each site keeps its AdamW moments and step count from its previous round in
    Flower's node state (``Context.state``, which never leaves the site) and continues them;
    nothing more is sent. After the aggregator's ``--resume`` (a new Flower run) the sites
    start afresh once. Not with ``aggregation = "exact"`` or ``site_ranks``: they
    re-factorize A and B between rounds, and kept moments would no longer match them."""

    evaluate_every: int = 1
    """Evaluate the global adapter on every site's held-out data (perplexity, task scores)
    after every this many rounds, and always after the last; the rounds between still
    train, checkpoint and record their training metrics and bytes. 1: every round. Held-out
    evaluation takes most of a short round's time (a cyclic round trains one site but
    evaluates all of them): ``evaluate_every`` = the number of sites evaluates a cyclic run
    once per cycle."""

    carry_evaluation: bool = False
    """Evaluate a round's global adapter at the start of the next round's training message,
    instead of in evaluation messages of its own (the last round still evaluates in its own).
    On the Deployment Engine every message starts a fresh ClientApp process that imports
    torch and loads the backbone: carrying needs one process per site per round instead of
    two. The round's row gets its evaluation when the next round's updates arrive; its
    numbers are the same. Not with cyclic participation (a round trains one site) or
    secure aggregation."""

    proximal_mu: float = 0.01
    """FedProx's proximal weight μ (``strategy = "fedprox"`` only)."""

    server_lr: float = 0.0
    """Server learning rate of a server optimizer; 0 picks one that suits LoRA factors: 1e-3
    for FedAdam, FedYogi and FedAdagrad (Flower's 0.1 moves every factor entry by up to 0.1
    a round, far more than local training does) and 1.0 for FedAvgM. Their state (moments,
    momentum) lives in the server process: ``--resume`` starts it afresh."""

    server_momentum: float = 0.9
    """FedAvgM's server momentum."""

    partition: Literal["sites", "dirichlet"] = "sites"
    """``sites``: each entry of ``sites`` is one site. ``dirichlet``: the entries are pooled,
    each one a category, and dealt out to ``num_partitions`` simulated sites in
    Dirichlet(``dirichlet_alpha``) shares per category (label skew); the sites are named
    ``part-00``, ``part-01``, ..."""

    num_partitions: int = 4
    """Simulated sites with ``partition = "dirichlet"``."""

    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet split: small (0.1) gives each site a few categories,
    large (100) an almost even split."""

    site_ranks: tuple[int, ...] = ()
    """LoRA rank each site trains, in site order (empty: every site trains ``lora.r``). A site
    with less memory trains a lower rank: it receives the global adapter re-factorized to its
    rank and sends back its own; ``aggregation = "exact"`` averages the products at the
    global rank ``lora.r``."""

    robust: Literal["none", "median", "trimmed-mean"] = "none"
    """Coordinate-wise median or trimmed mean instead of the weighted mean (factors mode)."""

    trim_fraction: float = 0.2
    """Share of the largest and of the smallest values dropped by ``trimmed-mean``."""

    clip_norm: float = 0.0
    """Clip each site's update (difference from the global adapter) to this L2 norm (0: off)."""

    weighting: Literal["examples", "equal"] = "examples"
    """How much each admitted update counts: ``examples``, the example count its site
    reports, bounded by ``max_weight_ratio`` and ``max_examples`` (FedAvg), or ``equal``
    (every site the same; the strictest bound on a site that lies about its count). The
    robust modes weigh their median or kept values the same way."""

    max_weight_ratio: float = 4.0
    """No site counts more than this many times the median reported example count of the
    round (0: no relative cap). A site that reports more is weighted at the cap, and the log
    says so; docs/security.md states the bound this puts on a lying site."""

    max_examples: float = 1e9
    """No site counts more than this many examples, whatever it reports (at most 1e12)."""

    min_sites: int = 0
    """Sites whose updates must pass the checks for a round to count (at most the sites the
    round goes to: one in a cyclic round). 0: every site must reply without failing, and at
    least one update must pass (the updates the checks refuse do not stop the round). A round
    that does not count writes no checkpoint and no seal, and the run stops with each site's
    reason (``fed_llama.server.outcome``)."""

    round_timeout: float = 3600.0
    """Seconds to wait for the sites' replies in a round."""

    update_compression: Literal["none", "int8", "int4"] = "none"
    """How a site's update travels: ``none``, its adapter in float32; ``int8`` or ``int4``,
    its change to the global adapter in 8- or 4-bit blocks of 128 values with a float16
    scale each (25.4% or 12.9% of the bytes), what rounding leaves out kept at the site and
    added to its next change (``fed_llama.adapter.compression``). Inside the envelope when
    envelopes are on; not with secure aggregation or ``site_ranks``."""

    def problems(self) -> list[str]:
        out = []
        if self.rounds < 1:
            out.append(f"rounds must be at least 1; got {self.rounds}")
        if len(self.sites) < 2:
            out.append(f"sites must list at least 2 data sources; got {len(self.sites)}")
        count = self.num_partitions if self.partition == "dirichlet" else len(self.sites)
        if not 0 <= self.min_sites <= count:
            out.append(f"min_sites must be in [0, {count}] (the number of sites); got "
                       f"{self.min_sites}")
        if self.partition == "dirichlet" and self.num_partitions < 2:
            out.append(f"num_partitions must be at least 2; got {self.num_partitions}")
        if self.dirichlet_alpha <= 0:
            out.append(f"dirichlet_alpha must be positive; got {self.dirichlet_alpha}")
        if self.robust != "none" and self.aggregation != "factors":
            out.append(f"robust = {self.robust!r} works on factor averages: set "
                       "aggregation = 'factors', or robust = 'none'")
        if self.strategy in SERVER_OPTIMIZERS and self.aggregation == "exact":
            out.append(f"strategy = {self.strategy!r} steps each factor along its average "
                       "change, but aggregation = 'exact' re-factorizes A and B every round "
                       "(their change is no gradient): use aggregation = 'factors' or 'ffa', "
                       "or strategy = 'fedavg'")
        if self.participation == "cyclic" and (self.strategy not in ("fedavg", "fedprox")
                                               or self.robust != "none"):
            out.append(f"participation = 'cyclic' takes one site's update per round as the "
                       f"global adapter; strategy = {self.strategy!r} and robust = "
                       f"{self.robust!r} need several: set strategy = 'fedavg' and robust = "
                       "'none', or participation = 'all'")
        if self.local_optimizer == "keep" and (self.aggregation == "exact" or self.site_ranks):
            what = ("aggregation = 'exact'" if self.aggregation == "exact"
                    else f"site_ranks = {list(self.site_ranks)}")
            out.append(f"local_optimizer = 'keep' continues each site's AdamW moments on the "
                       f"factors it trained, but {what} re-factorizes A and B between rounds: "
                       "set local_optimizer = 'restart', or use aggregation = 'factors' or "
                       "'ffa' with one rank")
        if self.carry_evaluation and self.participation == "cyclic":
            out.append("carry_evaluation has the next round's training messages evaluate, but "
                       "a cyclic round trains one site: set carry_evaluation = false, or "
                       "participation = 'all'")
        if self.evaluate_every < 1:
            out.append(f"evaluate_every must be at least 1 (1: every round); got "
                       f"{self.evaluate_every}")
        if self.proximal_mu < 0:
            out.append(f"proximal_mu must be 0 or more; got {self.proximal_mu}")
        if self.server_lr < 0:
            out.append(f"server_lr must be 0 (the strategy's default: 1e-3 for FedAdam/FedYogi/"
                       f"FedAdagrad, 1.0 for FedAvgM) or more; got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            out.append(f"server_momentum must be in [0, 1); got {self.server_momentum}")
        if not 0 <= self.trim_fraction < 0.5:
            out.append(f"trim_fraction must be in [0, 0.5); got {self.trim_fraction}")
        if self.clip_norm < 0:
            out.append(f"clip_norm must be 0 (off) or more; got {self.clip_norm}")
        if self.round_timeout <= 0:
            out.append(f"round_timeout must be positive; got {self.round_timeout}")
        if self.max_weight_ratio != 0 and not 1 <= self.max_weight_ratio <= 1e6:
            out.append(f"max_weight_ratio must be 0 (off) or in [1, 1e6]; got "
                       f"{self.max_weight_ratio}")
        if not 1 <= self.max_examples <= 1e12:
            out.append(f"max_examples must be in [1, 1e12]; got {self.max_examples}")
        return out


@dataclass(frozen=True)
class TaskEvalConfig:
    """Task accuracy of the global adapter each round ([evaluation])."""

    questions: int = 16
    """Held-out questions per task per site each round, answered greedily and scored
    (ICD-10: description -> code category and exact match, code -> description token F1;
    other data: exact match and token F1). 0: perplexity only."""

    tasks: tuple[str, ...] = ()
    """The kinds of question asked: of an ICD-10 site's ``desc2code``, ``code2desc``,
    ``includes`` and ``excludes``, or ``answer`` (a JSONL site's questions). Empty: every
    kind the held-out data has."""

    max_new_tokens: int = 24
    """Longest generated answer, in tokens."""

    batch_size: int = 16
    """Questions generated together."""

    perplexity_records: int = 0
    """Held-out records per site the perplexity is measured on: a seeded sample of the
    held-out set (``data.max_heldout_records``), from which the questions are still drawn
    whole. 0: all of them. A perplexity settles on a few hundred records; a share of a few
    percent of questions needs every question there is."""

    def problems(self) -> list[str]:
        out = []
        if self.questions < 0:
            out.append(f"questions must be 0 (off) or more; got {self.questions}")
        if self.perplexity_records < 0:
            out.append(f"perplexity_records must be 0 (all) or more; got "
                       f"{self.perplexity_records}")
        known = (*ICD10_TASKS, QUESTION_TASK)
        if any(t not in known for t in self.tasks):
            out.append(f"tasks must name kinds of question of {', '.join(known)} (or be empty: "
                       f"all); got {list(self.tasks)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            out.append("max_new_tokens and batch_size must be at least 1")
        return out


@dataclass(frozen=True)
class RoundTrainConfig(OptimConfig):
    """A site's local training per federation round ([train] of a scenario): ``max_steps`` is
    the local steps of one round. The warm-up is checked by the scenario, against the
    learning-rate schedule ``federation.lr_schedule`` makes (all rounds' steps with
    ``across-rounds``), not against one round's steps."""

    def schedule_problems(self) -> list[str]:
        return []


@dataclass(frozen=True)
class ScenarioConfig(MethodSections):
    """A simulated federation: backbone, adapter, local training, data and rounds (the adapter
    method and its settings: [adapter] and the method's section, see
    :mod:`fed_llama.config.adapter`)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The frozen backbone every site loads ([backbone])."""

    train: RoundTrainConfig = field(
        default_factory=lambda: RoundTrainConfig(max_steps=30, warmup_steps=3))
    """Local training per round ([train]); ``max_steps`` is the local steps per round."""

    data: DataConfig = field(default_factory=DataConfig)
    """Encoding and held-out settings for every site ([data]); ``source`` is ignored, each
    site's source comes from ``federation.sites``."""

    federation: FederationConfig = field(default_factory=FederationConfig)
    """Rounds and aggregation ([federation])."""

    security: SecurityConfig = field(default_factory=SecurityConfig)
    """Signed and encrypted updates, update checks ([security])."""

    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Client-level differential privacy ([privacy])."""

    evaluation: TaskEvalConfig = field(default_factory=TaskEvalConfig)
    """Task accuracy each round, beside held-out perplexity ([evaluation])."""

    secure_aggregation: SecureAggregationConfig = field(
        default_factory=SecureAggregationConfig)
    """Flower's SecAgg+: the aggregator sees only the sum of the updates
    ([secure_aggregation])."""

    attack: AttackConfig = field(default_factory=AttackConfig)
    """Simulated poisoning sites ([attack]; robustness experiments only)."""

    def site_rank(self, site: int) -> int:
        """The LoRA rank site ``site`` trains."""
        ranks = self.federation.site_ranks
        return ranks[site] if ranks else self.lora.r

    def site_names(self) -> list[str]:
        """A short name per site: the ICD-10 site, or the file's stem (``part-NN`` for a
        Dirichlet partition)."""
        fed = self.federation
        if fed.partition == "dirichlet":
            return [f"part-{i:02d}" for i in range(fed.num_partitions)]
        return [s[len(ICD10_PREFIX):] if s.startswith(ICD10_PREFIX) else Path(s).stem
                for s in fed.sites]

    def secagg_threshold(self) -> int:
        """SecAgg+'s reconstruction threshold (the setting, or all sites but one, at least 2)."""
        return (self.secure_aggregation.reconstruction_threshold
                or max(2, len(self.site_names()) - 1))

    def _secure_aggregation_problems(self) -> list[str]:
        if not self.secure_aggregation.enabled:
            return []
        fed, out = self.federation, []
        sites = len(self.site_names())
        if sites < 3:
            out.append(f"secure_aggregation needs at least 3 sites (SecAgg+ shares each "
                       f"site's masks among the others); this scenario has {sites}")
        if not 2 <= self.secagg_threshold() <= sites:
            out.append(f"secure_aggregation.reconstruction_threshold must be in [2, {sites}] "
                       f"(the number of sites); got {self.secagg_threshold()}")
        if fed.aggregation == "exact":
            out.append("secure_aggregation reveals only the sum of the updates, but "
                       "aggregation = 'exact' needs each site's B·A product: use aggregation "
                       "= 'factors' or 'ffa'")
        if fed.strategy != "fedavg" or fed.robust != "none" or fed.clip_norm:
            out.append("secure_aggregation gives the aggregator the mean only: set strategy = "
                       "'fedavg', robust = 'none' and clip_norm = 0 (a median, a clip or a "
                       "server optimizer's per-site view cannot be computed from a sum)")
        if fed.site_ranks:
            out.append("secure_aggregation sums factors of one shape: leave site_ranks empty")
        if fed.carry_evaluation:
            out.append("secure_aggregation's rounds (Flower's SecAgg+ workflow) evaluate in "
                       "messages of their own: set federation.carry_evaluation = false")
        if fed.evaluate_every != 1:
            out.append(f"secure_aggregation's rounds (Flower's SecAgg+ workflow) evaluate every "
                       f"round: set federation.evaluate_every = 1 (got {fed.evaluate_every})")
        if fed.update_compression != "none":
            out.append("secure_aggregation gives the aggregator only the sum of the updates, "
                       "but each site's compressed change has its own scales, which must be "
                       "decoded site by site: set federation.update_compression = 'none'")
        if self.privacy.noise_multiplier > 0:
            out.append("secure_aggregation with privacy.noise_multiplier > 0 is not supported "
                       "(the aggregator cannot clip each site's change): set one of them off")
        if self.security.envelopes or self.security.seal_rounds:
            out.append("secure_aggregation replaces the update envelopes (masked updates cannot "
                       "be signed and encrypted one by one): set security.envelopes = false "
                       "and security.seal_rounds = false")
        if self.attack.poison_sites:
            out.append("attack.poison_sites needs the per-site checks that secure aggregation "
                       "hides: leave it empty with secure_aggregation")
        return out

    def problems(self) -> list[str]:
        names = [s[len(ICD10_PREFIX):] if s.startswith(ICD10_PREFIX) else Path(s).stem
                 for s in self.federation.sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        out = [f"federation.sites has two sites named {dupes}: give each a distinct source"
               ] if dupes else []
        fed = self.federation
        out += self.method_problems() + lora_only_problems(self.method, fed.aggregation,
                                                           fed.site_ranks)
        attack = self.attack
        unknown = [s for s in (*attack.poison_sites, *attack.drop_sites, *attack.slow_sites)
                   if s not in self.site_names()]
        if unknown:
            out.append(f"attack.poison_sites/drop_sites/slow_sites name {unknown}, not sites of "
                       f"this scenario (its sites: {', '.join(self.site_names())})")
        if fed.update_compression != "none" and fed.site_ranks:
            out.append("federation.update_compression encodes each change against the global "
                       "adapter's shapes, which sites of other ranks do not share: leave "
                       "site_ranks empty or set update_compression = 'none'")
        if fed.site_ranks:
            count = len(self.site_names())
            if len(fed.site_ranks) != count:
                out.append(f"federation.site_ranks lists {len(fed.site_ranks)} ranks for "
                           f"{count} sites: give one per site")
            if any(not 1 <= r <= self.lora.r for r in fed.site_ranks):
                out.append(f"federation.site_ranks must each be in [1, lora.r={self.lora.r}]; "
                           f"got {list(fed.site_ranks)}")
            if fed.aggregation != "exact":
                out.append("federation.site_ranks needs aggregation = 'exact' (factors of "
                           "different ranks cannot be averaged one by one)")
            if fed.clip_norm:
                out.append("federation.clip_norm clips factor changes, which sites of other "
                           "ranks do not have: set clip_norm = 0 with site_ranks (the norm "
                           "bounds of [security] still apply, on the products)")
        out += self._secure_aggregation_problems()
        across = fed.lr_schedule == "across-rounds"
        span = self.train.max_steps * (fed.rounds if across else 1)  # the schedule's steps
        if self.train.max_steps >= 1 and fed.rounds >= 1 and not (
                0 <= self.train.warmup_steps < span):
            what = ("federation.rounds x train.max_steps: one schedule across the rounds"
                    if across else "train.max_steps: lr_schedule = 'per-round'")
            out.append(f"train.warmup_steps must be in [0, {span}) (the learning-rate "
                       f"schedule's steps, {what}); got {self.train.warmup_steps}")
        if fed.participation == "cyclic" and (self.secure_aggregation.enabled
                                              or self.privacy.noise_multiplier > 0):
            out.append("participation = 'cyclic' sends one site's own update each round: "
                       "secure_aggregation (a sum of several) and privacy.noise_multiplier "
                       "(noise scaled for all sites every round) do not apply; use "
                       "participation = 'all'")
        if self.privacy.noise_multiplier > 0:
            if fed.aggregation == "exact":
                out.append("privacy.noise_multiplier > 0 bounds each site's change to the "
                           "factors, which aggregation = 'exact' re-factorizes: use "
                           "aggregation = 'factors' or 'ffa'")
            if fed.robust != "none":
                out.append(f"privacy.noise_multiplier > 0 needs the plain mean; robust = "
                           f"{fed.robust!r} changes the sensitivity: set robust = 'none'")
            if fed.clip_norm:
                out.append("federation.clip_norm and privacy.clip_norm both clip updates: with "
                           "DP on, set only privacy.clip_norm")
        return out
