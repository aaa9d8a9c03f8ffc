"""The server optimizer's memory, kept across an aggregator restart.

Flower's FedAvgM keeps a momentum vector and FedAdam / FedYogi / FedAdagrad keep first and
second moments (``m_t``, ``v_t``) inside the strategy object; none of it is in the global
adapter. The aggregator writes them beside each round's checkpoint and ``--resume`` puts them
back, so a resumed run takes the same steps as one that was never interrupted (FedAdam and
FedYogi also see the same round number in their bias correction: see
:class:`fed_llama.server.strategy.RunRound`). Each function takes the strategy as
:func:`~fed_llama.server.strategy.build_strategy` makes it, wrappers and all.

Tensors are keyed ``<slot>/<adapter tensor name>``: FedAvgM pairs its momentum with the
adapter's arrays by position, so they are stored by name and put back in the order the
aggregator sends the adapter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fed_llama.server.wrapper import innermost

MOMENTUM = "momentum_vector"
"""FedAvgM's momentum: a list in the order of the arrays sent."""
MOMENTS = ("m_t", "v_t")
"""FedAdam / FedYogi / FedAdagrad's moments: dicts keyed by tensor name."""


def uses_server_state(strategy: Any) -> bool:
    """Whether ``strategy`` keeps state between rounds that the adapter does not hold."""
    strategy = innermost(strategy)
    if getattr(strategy, "server_momentum", 0.0) > 0.0:  # FedAvgM with momentum
        return True
    return all(hasattr(strategy, slot) for slot in MOMENTS)


def export_state(strategy: Any) -> dict[str, np.ndarray]:
    """The strategy's server-optimizer state after a round (empty when it keeps none)."""
    strategy = innermost(strategy)
    out: dict[str, np.ndarray] = {}
    momentum = getattr(strategy, MOMENTUM, None)
    if momentum is not None:
        names = list(strategy.current_arrays.keys())
        if len(names) != len(momentum):
            raise ValueError(f"FedAvgM holds {len(momentum)} momentum arrays for "
                             f"{len(names)} adapter tensors")
        out.update({f"{MOMENTUM}/{k}": np.ascontiguousarray(v)
                    for k, v in zip(names, momentum, strict=True)})
    for slot in MOMENTS:
        moments = getattr(strategy, slot, None)
        if moments:
            out.update({f"{slot}/{k}": np.ascontiguousarray(v) for k, v in moments.items()})
    return out


def restore_state(strategy: Any, saved: dict[str, np.ndarray], order: list[str]) -> None:
    """Put ``saved`` (from :func:`export_state`) back into a freshly built ``strategy``;
    ``order``: the adapter's tensor names in the order the aggregator sends them."""
    strategy = innermost(strategy)
    slots: dict[str, dict[str, np.ndarray]] = {}
    for key, value in saved.items():
        slot, _, name = key.partition("/")
        if slot not in (MOMENTUM, *MOMENTS) or not name:
            raise ValueError(f"unknown server optimizer state entry {key!r}")
        slots.setdefault(slot, {})[name] = value
    for slot, tensors in slots.items():
        if set(tensors) != set(order):
            missing, extra = sorted(set(order) - set(tensors)), sorted(set(tensors) - set(order))
            raise ValueError(f"the saved {slot} does not match the adapter (missing "
                             f"{missing[:3]}, unknown {extra[:3]})")
        if slot == MOMENTUM:
            setattr(strategy, MOMENTUM, [tensors[k] for k in order])
        else:
            setattr(strategy, slot, {k: tensors[k] for k in order})
