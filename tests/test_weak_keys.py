"""Keys that would let someone forge or read what they should not are refused at load and at
enrollment, with a one-line reason; site names are matched in full."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fed_llama.crypto import ServerKey, ServerPublicKey, SiteKey, SitePublicKey, TrustStore
from fed_llama.crypto.keyring import KeyFolder
from fed_llama.crypto.keys import check_site_name
from fed_llama.crypto.point_checks import _P, _add, _decode, check_ed25519_public
from fed_llama.crypto.refusal import Refused

SMALL_ORDER_ED25519 = [  # the eight points of order 1, 2, 4 and 8 (RFC 8032 encodings)
    "0100000000000000000000000000000000000000000000000000000000000000",  # identity
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
]
NON_CANONICAL_ED25519 = [
    (_P).to_bytes(32, "little").hex(),      # y = p, that is y = 0 spelled again
    (_P + 1).to_bytes(32, "little").hex(),  # y = p + 1: the identity spelled again
    "0100000000000000000000000000000000000000000000000000000000000080",  # negative zero x
]
LOW_ORDER_X25519 = [0, 1, _P - 1,
                    325606250916557431795983626356110631294008115727848805560023387167927233504,
                    39382357235489614581723060781553021112529911719440698176882885853963445705823]


def _encode(point: tuple[int, int, int, int]) -> bytes:
    x, y, z, _ = point
    inv = pow(z, _P - 2, _P)
    x, y = x * inv % _P, y * inv % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def test_the_identity_key_really_forges_signatures_in_the_library() -> None:
    """Why the check exists: cryptography accepts the identity as a key, and then the
    signature (R = identity, S = 0) verifies for every message."""
    identity = bytes.fromhex(SMALL_ORDER_ED25519[0])
    ed25519.Ed25519PublicKey.from_public_bytes(identity).verify(identity + bytes(32), b"any")
    with pytest.raises(Refused, match="small-order Ed25519 key") as err:
        SitePublicKey("cardiology", identity)
    assert err.value.reason == "bad-key"


@pytest.mark.parametrize("encoding", SMALL_ORDER_ED25519)
def test_every_small_order_ed25519_key_is_refused(encoding: str) -> None:
    with pytest.raises(Refused, match="small-order Ed25519 key"):
        SitePublicKey("cardiology", bytes.fromhex(encoding))


@pytest.mark.parametrize("encoding", NON_CANONICAL_ED25519)
def test_non_canonical_ed25519_encodings_are_refused(encoding: str) -> None:
    with pytest.raises(Refused, match="non-canonical Ed25519 encoding"):
        SitePublicKey("cardiology", bytes.fromhex(encoding))


def test_a_key_with_a_small_order_component_is_refused() -> None:
    honest = SiteKey.generate("cardiology").public().raw
    torsion = _decode(bytes.fromhex(SMALL_ORDER_ED25519[4]), "t")
    mixed = _encode(_add(_decode(honest, "h"), torsion))
    with pytest.raises(Refused, match="small-order component"):
        check_ed25519_public(mixed, "site 'cardiology'")


def test_honest_keys_pass_the_checks() -> None:
    for _ in range(30):
        key = SiteKey.generate("cardiology").public()
        assert check_ed25519_public(key.raw, "k") == key.raw
        ServerKey.generate().public()  # both of its keys are checked when built


@pytest.mark.parametrize("u", LOW_ORDER_X25519)
def test_low_order_x25519_aggregator_keys_are_refused(u: int) -> None:
    public = ServerKey.generate().public()
    with pytest.raises(Refused, match="low-order X25519 key") as err:
        ServerPublicKey(public.kem, {"x25519": u.to_bytes(32, "little")}, public.sign_raw)
    assert err.value.reason == "bad-key"


@pytest.mark.parametrize("raw", [(_P).to_bytes(32, "little"),
                                 (9 | (1 << 255)).to_bytes(32, "little")])
def test_non_canonical_x25519_aggregator_keys_are_refused(raw: bytes) -> None:
    public = ServerKey.generate().public()
    with pytest.raises(Refused, match="non-canonical X25519 encoding"):
        ServerPublicKey(public.kem, {"x25519": raw}, public.sign_raw)


def test_a_small_order_round_signing_key_is_refused_at_load(tmp_path: Path) -> None:
    data = ServerKey.generate().public().to_json()
    data["ed25519"] = "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="  # the identity
    (tmp_path / "server.pub.json").write_text(json.dumps(data))
    with pytest.raises(Refused, match="round-signing key: a small-order Ed25519 key"):
        ServerPublicKey.load(tmp_path / "server.pub.json")


def test_a_trust_store_holding_a_small_order_key_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "trust.json").write_text(json.dumps({
        "kind": "fed-llama-trust-store",
        "sites": {"cardiology": "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}))
    with pytest.raises(Refused, match="site 'cardiology': a small-order Ed25519 key"):
        TrustStore.load(tmp_path / "trust.json")


def test_fed_llama_keys_enroll_refuses_a_small_order_key_in_one_line(tmp_path: Path) -> None:
    KeyFolder(tmp_path / "keys").init_server("x25519")
    pub = tmp_path / "mallory.pub.json"
    pub.write_text(json.dumps({"kind": "fed-llama-site-public-key", "site": "mallory",
                               "ed25519": "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}))
    done = subprocess.run([sys.executable, "-m", "fed_llama.cli.main", "keys", "enroll",
                           str(pub), "--dir", str(tmp_path / "keys")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "small-order Ed25519 key" in lines[0], done.stderr
    assert "mallory" not in (tmp_path / "keys" / "trust.json").read_text()


@pytest.mark.parametrize("name", ["cardiology\n", "cardiology\r", "cardiology\x00",
                                  "c\u0430rdiology", "\uff43ardiology", "cardiology\u202e",
                                  "cardiology ", "", "-cardiology", "a" * 65])
def test_site_names_are_matched_in_full(name: str) -> None:
    with pytest.raises(Refused, match="site name"):
        check_site_name(name)
    with pytest.raises(Refused, match="site name"):
        SiteKey.generate(name)
