"""An adapter's state: its tensors by saved name, their size on the wire, and the one digest
that a round seal signs and a site checks.

Every adapter method declares its state as a flat mapping from the names it saves (peft's
names for LoRA) to tensors. The aggregator and the sites compute the digest of a state with
:func:`state_digest` alone, so what one side signs is what the other side checks.
"""

from __future__ import annotations

from typing import Any

from fed_llama.crypto import safetensors_manifest
from fed_llama.crypto.seal import manifest_digest

State = dict[str, Any]
"""An adapter's tensors by saved name (torch tensors)."""


def state_payload(state: State) -> bytes:
    """The state as safetensors bytes (what an update envelope encrypts)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def state_bytes(state: State) -> int:
    """The bytes of the state's tensors (without any header)."""
    return sum(int(t.numel()) * t.element_size() for t in state.values())


def state_digest(state: State) -> str:
    """The sha256 a round seal signs for ``state``: of its tensor manifest (names, dtypes,
    shapes and each tensor's sha256), independent of the tensors' order."""
    return manifest_digest(safetensors_manifest(state_payload(state)))
