"""How a federation protects updates: envelopes and checks ([security]), client-level
differential privacy ([privacy]) and Flower's SecAgg+ ([secure_aggregation])."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SecurityConfig:
    """How updates are protected and checked ([security])."""

    envelopes: bool = True
    """Sites sign (Ed25519) and encrypt (HPKE) every update to the aggregator, which verifies,
    decrypts and refuses forged, replayed, stale or malformed ones. ``false`` sends plain
    arrays: for debugging only."""

    keys: str = field(default="", metadata={"path": True})
    """Folder made by ``fed-llama keys``: ``server.key``, ``server.pub.json``, ``trust.json``,
    ``sites/<site>.key``. Empty: ``fed-llama simulate`` makes a fresh set in ``<out>/keys``
    (in a simulation every party runs on this machine)."""

    kem: Literal["x25519", "mlkem768-x25519"] = "x25519"
    """HPKE KEM of keys made by ``simulate``: X25519, or the hybrid post-quantum
    ML-KEM-768 + X25519 for data that must stay secret for decades."""

    seal_rounds: bool = True
    """The aggregator signs each round's global adapter, hash-chained to the previous round;
    sites verify the seal before training."""

    max_age: float = 3600.0
    """Seconds an update envelope stays acceptable after the site made it."""

    max_update_norm: float = 0.0
    """Refuse an update whose change from the global adapter has an L2 norm above this
    (0: no absolute bound)."""

    norm_outlier_factor: float = 10.0
    """Refuse an update whose change is more than this many times the median change of the
    round's updates (needs 3 or more updates; 0: off)."""

    passphrase_env: str = ""
    """Environment variable holding the passphrase of the private keys (empty: unencrypted
    keys)."""

    encrypt_checkpoints: bool = False
    """Write each round's adapter weights only encrypted to the aggregator's own HPKE key
    (``adapter_model.safetensors.hpke``): a stolen disk or backup of the run folder yields no
    weights. ``--resume`` decrypts by itself; ``fed-llama keys decrypt-checkpoint`` writes a
    plain copy for eval or export."""

    def problems(self) -> list[str]:
        out = []
        if self.max_age <= 0:
            out.append(f"max_age must be positive; got {self.max_age}")
        if self.max_update_norm < 0:
            out.append(f"max_update_norm must be 0 (off) or more; got {self.max_update_norm}")
        if self.norm_outlier_factor != 0 and self.norm_outlier_factor <= 1:
            out.append("norm_outlier_factor must be 0 (off) or above 1; got "
                       f"{self.norm_outlier_factor}")
        if self.seal_rounds and not self.envelopes:
            out.append("seal_rounds needs the aggregator's keys: set envelopes = true, or "
                       "seal_rounds = false")
        if self.encrypt_checkpoints and not self.envelopes:
            out.append("encrypt_checkpoints needs the aggregator's keys: set envelopes = true, "
                       "or encrypt_checkpoints = false")
        return out


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy ([privacy]): clip each site's change, add noise."""

    noise_multiplier: float = 0.0
    """Gaussian noise standard deviation as a multiple of ``clip_norm`` (0: no DP). Around 1
    gives epsilon of a few after tens of rounds; more noise, smaller epsilon, lower utility."""

    clip_norm: float = 0.01
    """L2 bound on each site's change to the global adapter per round (DP's sensitivity)."""

    delta: float = 1e-5
    """The delta of (epsilon, delta)-DP; below 1 / (number of sites' records)."""

    def problems(self) -> list[str]:
        out = []
        if self.noise_multiplier < 0:
            out.append(f"noise_multiplier must be 0 (off) or more; got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and self.clip_norm <= 0:
            out.append(f"clip_norm must be positive with noise; got {self.clip_norm}")
        if not 0 < self.delta < 1:
            out.append(f"delta must be in (0, 1); got {self.delta}")
        return out


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+ ([secure_aggregation]): the aggregator learns only the sites' sum."""

    enabled: bool = False
    """Sites mask their updates with pairwise and private masks (Flower's SecAgg+ workflow
    and ``secaggplus_mod``); the aggregator unmasks only the example-weighted sum. Works with
    ``aggregation = "factors"`` or ``"ffa"`` and ``strategy = "fedavg"``; needs 3 or more
    sites. The update envelopes do not apply (the masks protect the updates; use TLS and
    SuperNode authentication in a deployment), so set ``security.envelopes = false``."""

    reconstruction_threshold: int = 0
    """Sites that must stay to the end of a round for it to be unmasked (0: all but one, at
    least 2): up to ``sites - threshold`` sites may drop out of a round."""

    clipping_range: float = 1.0
    """Every adapter value is clipped to [-range, range] before quantization: larger than any
    LoRA factor entry, small enough to keep the quantization error low."""

    max_weight: float = 100000.0
    """Largest example count a site may report. Each site's weight (its example count) is
    quantized to count / max_weight in 2^22 levels: keep it near the largest site (the
    ICD-10 sites have 2,000-4,500 examples: relative weight error below 1e-5)."""

    timeout: float = 3600.0
    """Seconds each SecAgg+ stage waits for the sites."""

    def problems(self) -> list[str]:
        out = []
        if self.reconstruction_threshold < 0:
            out.append("reconstruction_threshold must be 0 (all sites but one) or at least 2; "
                       f"got {self.reconstruction_threshold}")
        if self.clipping_range <= 0 or self.max_weight <= 0 or self.timeout <= 0:
            out.append("clipping_range, max_weight and timeout must be positive")
        return out
