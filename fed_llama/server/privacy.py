"""Client-level differential privacy on the aggregator (DP-FedAvg with fixed clipping).

Each round, every admitted site's change to the global adapter is clipped to L2 norm ``C``
(``privacy.clip_norm``), the clipped changes are averaged with equal weights (so one site can
move the sum by at most ``C``), and Gaussian noise of standard deviation ``sigma * C / n`` is
added to the mean of the ``n`` sites' changes (``sigma`` = ``privacy.noise_multiplier``). The
number of participating sites is treated as public. Every site takes part in every round (no
sampling), so ``T`` rounds compose ``T`` Gaussian mechanisms; :func:`epsilon` turns that into
(epsilon, delta) with the RDP accountant of Google's ``dp-accounting``.

Flower's own DP wrappers clip the arrays of each reply; here updates arrive encrypted and the
mean is LoRA-aware, so the same mechanism runs inside the strategy, after decryption and
admission.
"""

from __future__ import annotations

import secrets

import torch

from fed_llama.adapter.state import State


def add_noise(mean: State, current: State, *, sites: int, clip_norm: float,
              noise_multiplier: float, trainable: set[str] | None = None,
              generator: torch.Generator | None = None) -> State:
    """``mean`` plus N(0, (noise_multiplier * clip_norm / sites)^2) on each trainable entry.

    ``mean`` is ``current`` plus the equal-weight mean of the clipped changes; tensors not in
    ``trainable`` (FFA-LoRA's frozen A) get no noise: no site can change them.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))  # unpredictable noise
    std = noise_multiplier * clip_norm / max(sites, 1)
    out = {}
    for name, value in mean.items():
        if trainable is not None and name not in trainable:
            out[name] = current[name].clone()
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * std
        out[name] = (value.double() + noise).to(current[name].dtype)
    return out


def epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """(epsilon, delta)-DP after ``rounds`` full-participation rounds (RDP accountant)."""
    if rounds <= 0:
        return 0.0
    try:
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError as exc:
        from fed_llama.errors import ConfigError

        raise ConfigError("privacy.noise_multiplier > 0 needs the privacy accountant: pip "
                          "install 'fed-llama[privacy]' (dp-accounting)") from exc
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))
