"""Signed and encrypted update envelopes: every hostile input is refused with its reason."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from fed_llama.crypto import (
    Refused,
    ReplayGuard,
    ServerKey,
    ServerPublicKey,
    SiteKey,
    TrustStore,
    make_envelope,
    open_envelope,
    safetensors_manifest,
)
from fed_llama.crypto.envelope import MAGIC, SIGNATURE_BYTES

NOW = 1_800_000_000.0
SERVER = ServerKey.generate()
SITE = SiteKey.generate("cardiology")
TRUST = TrustStore()
TRUST.enroll(SITE.public())
PAYLOAD = save({"layer.lora_A.weight": torch.randn(4, 8), "layer.lora_B.weight": torch.zeros(8, 4)})


def seal(payload: bytes = PAYLOAD, *, site: SiteKey = SITE, run: str = "run-1",
         server_round: int = 3, issued: float = NOW, server: ServerPublicKey | None = None
         ) -> bytes:
    return make_envelope(payload, site_key=site, server=server or SERVER.public(), run=run,
                         server_round=server_round, clock=lambda: issued)


def open_(data: bytes, guard: ReplayGuard | None = None, now: float = NOW) -> bytes:
    return open_envelope(data, server_key=SERVER, trust=TRUST, run="run-1", server_round=3,
                         guard=guard or ReplayGuard(), max_bytes=64_000, max_age=600,
                         clock=lambda: now).payload


def resign(body: bytes, key: SiteKey = SITE) -> bytes:
    return body + key.sign(body)


def with_header(data: bytes, change: Callable[[dict], None]) -> bytes:
    """Rewrite the header (and re-sign as the real site, so only the later checks can catch it)."""
    (n,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12:12 + n])
    change(header)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return resign(MAGIC + struct.pack(">I", len(head)) + head + data[12 + n:-SIGNATURE_BYTES])


def test_an_honest_update_opens_to_its_exact_bytes() -> None:
    assert open_(seal()) == PAYLOAD


def test_the_hybrid_post_quantum_kem_round_trips() -> None:
    server = ServerKey.generate("mlkem768-x25519")
    data = seal(server=server.public())
    opened = open_envelope(data, server_key=server, trust=TRUST, run="run-1", server_round=3,
                           guard=ReplayGuard(), max_bytes=64_000, clock=lambda: NOW)
    assert opened.payload == PAYLOAD and opened.header.kem == "mlkem768-x25519"


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


MALLORY = SiteKey.generate("mallory")
OTHER_SERVER = ServerKey.generate()

HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "forged signature": (lambda: seal()[:-SIGNATURE_BYTES] + bytes(SIGNATURE_BYTES),
                         "bad-signature"),
    "signed by another site's key": (lambda: resign(seal()[:-SIGNATURE_BYTES],
                                                    SiteKey.generate("cardiology")),
                                     "bad-signature"),
    "unknown site": (lambda: seal(site=MALLORY), "unknown-site"),
    "replayed from an earlier round": (lambda: seal(server_round=2), "replayed"),
    "a round not started": (lambda: seal(server_round=4), "wrong-round"),
    "another run": (lambda: seal(run="run-0"), "wrong-run"),
    "stale": (lambda: seal(issued=NOW - 3600), "stale"),
    "from the future": (lambda: seal(issued=NOW + 3600), "stale"),
    "truncated ciphertext": (lambda: seal()[:-200], "truncated"),
    "flipped ciphertext bit": (lambda: _flip(seal(), len(seal()) - SIGNATURE_BYTES - 20),
                               "bad-signature"),
    "flipped bit re-signed by the site": (
        lambda: resign(_flip(seal(), len(seal()) - SIGNATURE_BYTES - 20)[:-SIGNATURE_BYTES]),
        "decrypt-failed"),
    "header altered and re-signed": (
        lambda: with_header(seal(), lambda h: h.update(nonce="00" * 16)), "decrypt-failed"),
    "encrypted to another aggregator": (lambda: seal(server=OTHER_SERVER.public()),
                                        "decrypt-failed"),
    "oversized payload": (lambda: seal(save({"x": torch.zeros(20_000)})), "oversized"),
    "garbage bytes": (lambda: b"\x00garbage" * 10, "malformed"),
    "empty": (lambda: b"", "malformed"),
    "bad header json": (lambda: resign(MAGIC + struct.pack(">I", 3) + b"{x}"), "malformed"),
    "trailing bytes": (lambda: seal() + b"x", "malformed"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_each_hostile_envelope_is_refused_with_its_reason(case: str) -> None:
    make, reason = HOSTILE[case]
    with pytest.raises(Refused) as err:
        open_(make())
    assert err.value.reason == reason, str(err.value)


def test_a_header_that_lies_about_the_payload_is_refused() -> None:
    honest = seal()
    other = seal(save({"other.weight": torch.ones(2)}))
    # the site signs a header describing PAYLOAD over another payload's ciphertext
    (n,) = struct.unpack(">I", honest[8:12])
    (m,) = struct.unpack(">I", other[8:12])
    with pytest.raises(Refused) as err:
        open_(resign(honest[:12 + n] + other[12 + m:-SIGNATURE_BYTES]))
    assert err.value.reason in {"truncated", "decrypt-failed"}


def test_the_same_envelope_twice_is_a_replay() -> None:
    guard, data = ReplayGuard(), seal()
    assert open_(data, guard) == PAYLOAD
    with pytest.raises(Refused, match="already delivered") as err:
        open_(data, guard)
    assert err.value.reason == "replayed"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_the_parser_only_ever_refuses_random_bytes(data: bytes) -> None:
    with pytest.raises(Refused):
        open_(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255),
       st.integers(min_value=0, max_value=3000))
def test_the_parser_only_ever_refuses_mutated_envelopes(pos: int, byte: int, cut: int) -> None:
    data = bytearray(seal())
    data[pos % len(data)] = byte if data[pos % len(data)] != byte else (byte + 1) % 256
    with pytest.raises(Refused):
        open_(bytes(data[:len(data) - cut]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_the_safetensors_reader_only_ever_refuses(data: bytes) -> None:
    with contextlib.suppress(Refused):
        safetensors_manifest(struct.pack("<Q", len(data)) + data)


def test_private_keys_are_0600_and_passphrase_protected(tmp_path: Path) -> None:
    SITE.save(tmp_path / "site.key", passphrase=b"correct horse")
    SERVER.save(tmp_path / "server.key")
    assert (tmp_path / "site.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    assert "BEGIN ENCRYPTED PRIVATE KEY" in (tmp_path / "site.key").read_text()
    loaded = SiteKey.load(tmp_path / "site.key", passphrase=b"correct horse")
    assert loaded.public() == SITE.public()
    with pytest.raises(Refused, match="wrong passphrase") as err:
        SiteKey.load(tmp_path / "site.key", passphrase=b"wrong")
    assert err.value.reason == "bad-key"
    with pytest.raises(Refused, match="give the key's passphrase"):
        SiteKey.load(tmp_path / "site.key")
    assert ServerKey.load(tmp_path / "server.key").public() == SERVER.public()


def test_key_files_of_the_wrong_kind_are_refused(tmp_path: Path) -> None:
    SITE.public().save(tmp_path / "site.pub")
    with pytest.raises(Refused, match="is not a fed-llama-site-key file"):
        SiteKey.load(tmp_path / "site.pub")
    with pytest.raises(Refused, match="does not exist"):
        ServerKey.load(tmp_path / "missing.key")
    with pytest.raises(Refused, match="site name"):
        SiteKey.generate("../etc")


def test_the_trust_store_refuses_a_silent_key_change(tmp_path: Path) -> None:
    store = TrustStore()
    store.enroll(SITE.public())
    with pytest.raises(Refused, match="already enrolled"):
        store.enroll(SiteKey.generate("cardiology").public())
    store.save(tmp_path / "trust.json")
    assert TrustStore.load(tmp_path / "trust.json") == store
    with pytest.raises(Refused) as err:
        store.get("oncology")
    assert err.value.reason == "unknown-site"


def test_public_keys_are_checked_when_built() -> None:
    public = SERVER.public()
    with pytest.raises(Refused, match=r"has parts \['x25519'\]; expected \['mlkem768', 'x25519'\]"):
        dataclasses.replace(public, kem="mlkem768-x25519")
    with pytest.raises(Refused, match="32 bytes"):
        dataclasses.replace(SITE.public(), raw=b"short")


def test_the_crypto_package_imports_neither_torch_nor_flwr() -> None:
    code = ("import sys, fed_llama.crypto; "
            "bad = [m for m in ('torch', 'flwr') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_round_seals_chain_and_bind_the_adapter() -> None:
    from fed_llama.crypto import seal_round, verify_round
    from fed_llama.crypto.seal import GENESIS, manifest_digest

    digest = manifest_digest(safetensors_manifest(PAYLOAD))
    first = seal_round(SERVER, run="run-1", server_round=1, adapter_sha256=digest, prev=None)
    second = seal_round(SERVER, run="run-1", server_round=2, adapter_sha256=digest, prev=first)
    assert first.prev == GENESIS and second.prev == first.digest
    verify_round(second, SERVER.public(), run="run-1", server_round=2, adapter_sha256=digest,
                 prev_digest=first.digest)
    other = manifest_digest(safetensors_manifest(save({"x": torch.ones(1)})))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"adapter_sha256": other}, "not the one the aggregator sealed"),
        ({"server_round": 3}, "expected run 'run-1' round 3"),
        ({"prev_digest": "f" * 64}, "does not follow")]
    for kwargs, message in cases:
        args: dict[str, Any] = {"run": "run-1", "server_round": 2, "adapter_sha256": digest,
                                **kwargs}
        with pytest.raises(Refused, match=message):
            verify_round(second, SERVER.public(), **args)
    with pytest.raises(Refused, match="signature does not verify") as err:
        verify_round(second, OTHER_SERVER.public(), run="run-1", server_round=2,
                     adapter_sha256=digest)
    assert err.value.reason == "bad-seal"
