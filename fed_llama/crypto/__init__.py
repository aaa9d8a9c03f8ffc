"""Keys, signed and encrypted update envelopes, signed round seals.

Imports neither torch nor flwr: it works on bytes. Built on ``cryptography``'s HPKE (RFC 9180)
and Ed25519. Every failed check raises :class:`Refused` with a machine-readable ``reason``.
"""

from fed_llama.crypto.envelope import (
    EnvelopeHeader,
    OpenedEnvelope,
    ReplayGuard,
    TensorSpec,
    make_envelope,
    open_envelope,
    safetensors_manifest,
)
from fed_llama.crypto.keys import (
    KEMS,
    ServerKey,
    ServerPublicKey,
    SiteKey,
    SitePublicKey,
    TrustStore,
)
from fed_llama.crypto.refusal import Reason, Refused
from fed_llama.crypto.seal import RoundSeal, seal_round, verify_round

__all__ = [
    "KEMS",
    "EnvelopeHeader",
    "OpenedEnvelope",
    "Reason",
    "Refused",
    "ReplayGuard",
    "RoundSeal",
    "ServerKey",
    "ServerPublicKey",
    "SiteKey",
    "SitePublicKey",
    "TensorSpec",
    "TrustStore",
    "make_envelope",
    "open_envelope",
    "safetensors_manifest",
    "seal_round",
    "verify_round",
]
