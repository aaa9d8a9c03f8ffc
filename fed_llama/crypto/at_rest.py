"""Files encrypted at rest to the aggregator's own HPKE key: its round checkpoints.

A stolen disk or backup of the run folder then yields no adapter weights; only the holder of
``server.key`` can read them. Each file is bound to a label (the run id and round), so a
checkpoint moved into another run's or round's place does not decrypt.
"""

from __future__ import annotations

from collections.abc import Callable

from fed_llama.crypto.keys import ServerKey, ServerPublicKey
from fed_llama.crypto.refusal import Refused

MAGIC = b"fed-llama-at-rest-v1\n"
_INFO = b"fed-llama checkpoint at rest v1\x00"


def encrypt_at_rest(public: ServerPublicKey, data: bytes, label: str) -> bytes:
    """``data`` HPKE-encrypted to the aggregator's key, bound to ``label``."""
    return MAGIC + public.encrypt(data, _INFO + label.encode("utf-8"))


def decrypt_at_rest(key: ServerKey, blob: bytes, label: str) -> bytes:
    """The plaintext of :func:`encrypt_at_rest`, or :class:`Refused` with the reason."""
    if not blob.startswith(MAGIC):
        raise Refused("malformed", f"{label}: not a fed-llama file encrypted at rest")
    try:
        return key.decrypt(blob[len(MAGIC):], _INFO + label.encode("utf-8"))
    except Refused:
        raise Refused("decrypt-failed", f"{label}: not encrypted to this aggregator's key, or "
                      "made for another run or round") from None


def checkpoint_ciphers(key: ServerKey) -> tuple[Callable[[bytes, str], bytes],
                                                Callable[[bytes, str], bytes]]:
    """``(encrypt, decrypt)`` of ``(data, label)`` with the aggregator's key, for its run store."""
    public = key.public()

    def encrypt(data: bytes, label: str) -> bytes:
        return encrypt_at_rest(public, data, label)

    def decrypt(blob: bytes, label: str) -> bytes:
        return decrypt_at_rest(key, blob, label)

    return encrypt, decrypt
