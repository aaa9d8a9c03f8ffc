"""Site and aggregator keys, their files, and the aggregator's trust store.

- A site holds an Ed25519 signing key (:class:`SiteKey`); its public half
  (:class:`SitePublicKey`) is enrolled in the aggregator's :class:`TrustStore`.
- The aggregator holds an HPKE (RFC 9180) key to decrypt updates, X25519 or the hybrid
  post-quantum ML-KEM-768 + X25519, and an Ed25519 key to sign each round
  (:class:`ServerKey`); sites hold its public half (:class:`ServerPublicKey`).

Private key files are JSON with PKCS#8 PEM inside (encrypted when a passphrase is given),
written atomically with mode 0600. Public files are JSON with raw keys in base64. Keys are
checked when built; a file that cannot be used raises :class:`Refused` (``bad-key``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from fed_llama.common.bounded_json import BadJson, loads
from fed_llama.common.files import write_text_atomic
from fed_llama.crypto.point_checks import check_ed25519_public, check_x25519_public
from fed_llama.crypto.refusal import Reason, Refused

Kem = Literal["x25519", "mlkem768-x25519"]
KEMS: tuple[str, ...] = ("x25519", "mlkem768-x25519")
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A site's name, matched in full (no trailing newline, no control or lookalike character)."""
MAX_KEY_FILE_BYTES = 1 << 20
"""Largest key or trust-store file read (a trust store of thousands of sites fits)."""

_SUITES = {
    "x25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305),
    "mlkem768-x25519": hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256,
                                  hpke.AEAD.CHACHA20_POLY1305),
}


def check_site_name(site: str) -> str:
    if not isinstance(site, str) or not SITE_NAME.fullmatch(site):
        raise Refused("bad-key", f"site name {str(site)[:80]!r} must be 1-64 ASCII letters, "
                      "digits, '.', '_' or '-', starting with a letter or digit")
    return site


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any, what: str, size: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(str(text), validate=True)
    except ValueError as exc:
        raise Refused("bad-key", f"{what} is not base64") from exc
    if size is not None and len(raw) != size:
        raise Refused("bad-key", f"{what} must be {size} bytes; got {len(raw)}")
    return raw


def _pem(key: Any, passphrase: bytes | None) -> str:
    algo: ser.KeySerializationEncryption = (ser.BestAvailableEncryption(passphrase)
                                            if passphrase else ser.NoEncryption())
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, algo).decode("ascii")


def _unpem(text: Any, kind: type, passphrase: bytes | None, where: str) -> Any:
    try:
        key = ser.load_pem_private_key(str(text).encode("ascii"), passphrase)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        raise Refused("bad-key", f"{where}: {exc}: give the key's passphrase, or none for an "
                      "unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise Refused("bad-key", f"{where}: cannot read the key ({exc}); a wrong passphrase "
                      "reads the same") from None
    if not isinstance(key, kind):
        raise Refused("bad-key", f"{where}: holds a {type(key).__name__}, expected "
                      f"{kind.__name__}")
    return key


def _read_json(path: Path, kind: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as fh:
            raw = fh.read(MAX_KEY_FILE_BYTES + 1)
        data = loads(raw, max_bytes=MAX_KEY_FILE_BYTES)
    except FileNotFoundError as exc:
        raise Refused("bad-key", f"key file {str(path)!r} does not exist: create it with "
                      "`fed-llama keys`") from exc
    except (OSError, BadJson) as exc:
        raise Refused("bad-key", f"key file {str(path)!r} is not a fed-llama key file: "
                      f"{exc}") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise Refused("bad-key", f"key file {str(path)!r} is not a {kind} file")
    return data


def fingerprint(raw: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(raw).hexdigest()[:16]


def _verify(key: ed25519.Ed25519PublicKey, signature: bytes, data: bytes, reason: Reason,
            who: str) -> None:
    try:
        key.verify(signature, data)
    except InvalidSignature as exc:
        raise Refused(reason, f"the signature does not verify with {who}'s enrolled key: "
                      "forged, or altered after signing") from exc


@dataclass(frozen=True)
class SitePublicKey:
    """A site's name and Ed25519 verification key."""

    site: str
    raw: bytes

    def __post_init__(self) -> None:
        check_site_name(self.site)
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise Refused("bad-key", f"site {self.site!r}: an Ed25519 public key is 32 bytes")
        check_ed25519_public(self.raw, f"site {self.site!r}")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`Refused` (``bad-signature``) unless ``signature`` signs ``data``."""
        _verify(ed25519.Ed25519PublicKey.from_public_bytes(self.raw), signature, data,
                "bad-signature", f"site {self.site!r}")

    def to_json(self) -> dict[str, str]:
        return {"kind": "fed-llama-site-public-key", "site": self.site, "ed25519": _b64(self.raw)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "site public key") -> SitePublicKey:
        return cls(check_site_name(data.get("site", "")),
                   _unb64(data.get("ed25519"), f"{where} ed25519", 32))

    @classmethod
    def load(cls, path: Path) -> SitePublicKey:
        return cls.from_json(_read_json(path, "fed-llama-site-public-key"), str(path))

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_json(), indent=2) + "\n")


class SiteKey:
    """A site's Ed25519 signing key."""

    def __init__(self, site: str, private: ed25519.Ed25519PrivateKey) -> None:
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise Refused("bad-key", f"site {site!r}: a site key must be Ed25519; got "
                          f"{type(private).__name__}")
        self.site = check_site_name(site)
        self._private = private

    @classmethod
    def generate(cls, site: str) -> SiteKey:
        return cls(site, ed25519.Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def public(self) -> SitePublicKey:
        return SitePublicKey(self.site, self._private.public_key().public_bytes_raw())

    def save(self, path: Path, passphrase: bytes | None = None) -> None:
        """Write the key (mode 0600), encrypted with ``passphrase`` if given."""
        data = {"kind": "fed-llama-site-key", "site": self.site,
                "ed25519": _pem(self._private, passphrase)}
        write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n", mode=0o600)

    @classmethod
    def load(cls, path: Path, passphrase: bytes | None = None) -> SiteKey:
        data = _read_json(path, "fed-llama-site-key")
        return cls(check_site_name(data.get("site", "")),
                   _unpem(data.get("ed25519"), ed25519.Ed25519PrivateKey, passphrase, str(path)))


@dataclass(frozen=True)
class ServerPublicKey:
    """What sites hold of the aggregator: its HPKE public key and its round-signing key."""

    kem: str
    kem_raw: dict[str, bytes]
    sign_raw: bytes

    def __post_init__(self) -> None:
        if self.kem not in KEMS:
            raise Refused("bad-key", f"kem {self.kem[:40]!r} is not one of {KEMS}")
        want = {"x25519"} if self.kem == "x25519" else {"x25519", "mlkem768"}
        if set(self.kem_raw) != want:
            raise Refused("bad-key", f"the aggregator's {self.kem} public key has parts "
                          f"{sorted(self.kem_raw)[:4]}; expected {sorted(want)}")
        check_x25519_public(self.kem_raw["x25519"], "the aggregator's X25519 key")
        self._hpke_key()  # checks every component
        check_ed25519_public(self.sign_raw, "the aggregator's Ed25519 round-signing key")

    def _hpke_key(self) -> Any:
        try:
            x = x25519.X25519PublicKey.from_public_bytes(self.kem_raw["x25519"])
            if self.kem == "x25519":
                return x
            m = mlkem.MLKEM768PublicKey.from_public_bytes(self.kem_raw["mlkem768"])
            return hpke.MLKEM768X25519PublicKey(m, x)
        except (KeyError, ValueError) as exc:
            raise Refused("bad-key", f"the aggregator's {self.kem} public key is incomplete or "
                          f"invalid: {exc}") from exc

    @property
    def fingerprint(self) -> str:
        return fingerprint(b"".join(self.kem_raw[k] for k in sorted(self.kem_raw))
                           + self.sign_raw)

    def encrypt(self, plaintext: bytes, info: bytes) -> bytes:
        return _SUITES[self.kem].encrypt(plaintext, self._hpke_key(), info=info)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`Refused` (``bad-seal``) unless the aggregator signed ``data``."""
        _verify(ed25519.Ed25519PublicKey.from_public_bytes(self.sign_raw), signature, data,
                "bad-seal", "the aggregator")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "fed-llama-server-public-key", "kem": self.kem,
                "hpke": {k: _b64(v) for k, v in sorted(self.kem_raw.items())},
                "ed25519": _b64(self.sign_raw)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "server public key"
                  ) -> ServerPublicKey:
        parts = data.get("hpke")
        if not isinstance(parts, dict):
            raise Refused("bad-key", f"{where}: no 'hpke' keys")
        return cls(str(data.get("kem")), {k: _unb64(v, f"{where} hpke.{k}")
                                          for k, v in parts.items()},
                   _unb64(data.get("ed25519"), f"{where} ed25519", 32))

    @classmethod
    def load(cls, path: Path) -> ServerPublicKey:
        return cls.from_json(_read_json(path, "fed-llama-server-public-key"), str(path))

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_json(), indent=2) + "\n")


class ServerKey:
    """The aggregator's HPKE decryption key and Ed25519 round-signing key."""

    def __init__(self, kem: str, x25519_key: x25519.X25519PrivateKey,
                 sign_key: ed25519.Ed25519PrivateKey,
                 mlkem_key: mlkem.MLKEM768PrivateKey | None = None) -> None:
        if kem not in KEMS:
            raise Refused("bad-key", f"kem {kem!r} is not one of {KEMS}")
        if not isinstance(x25519_key, x25519.X25519PrivateKey):
            raise Refused("bad-key", "the aggregator's HPKE key needs an X25519 private key")
        if not isinstance(sign_key, ed25519.Ed25519PrivateKey):
            raise Refused("bad-key", "the aggregator's signing key must be Ed25519")
        if (kem == "mlkem768-x25519") != isinstance(mlkem_key, mlkem.MLKEM768PrivateKey):
            raise Refused("bad-key", f"kem {kem!r} needs an ML-KEM-768 key exactly when hybrid")
        self.kem = kem
        self._x, self._sign, self._mlkem = x25519_key, sign_key, mlkem_key
        self._hpke: Any = (x25519_key if mlkem_key is None
                           else hpke.MLKEM768X25519PrivateKey(mlkem_key, x25519_key))

    @classmethod
    def generate(cls, kem: str = "x25519") -> ServerKey:
        return cls(kem, x25519.X25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate(),
                   mlkem.MLKEM768PrivateKey.generate() if kem == "mlkem768-x25519" else None)

    def public(self) -> ServerPublicKey:
        raw = {"x25519": self._x.public_key().public_bytes_raw()}
        if self._mlkem is not None:
            raw["mlkem768"] = self._mlkem.public_key().public_bytes_raw()
        return ServerPublicKey(self.kem, raw, self._sign.public_key().public_bytes_raw())

    def decrypt(self, ciphertext: bytes, info: bytes) -> bytes:
        """Decrypt an HPKE ciphertext made for this key with ``info``, or refuse."""
        try:
            return _SUITES[self.kem].decrypt(ciphertext, self._hpke, info=info)
        except (InvalidTag, ValueError) as exc:
            raise Refused("decrypt-failed", "the update was not encrypted to this aggregator's "
                          "key, or not for this header") from exc

    def sign(self, data: bytes) -> bytes:
        return self._sign.sign(data)

    def save(self, path: Path, passphrase: bytes | None = None) -> None:
        """Write the key (mode 0600), encrypted with ``passphrase`` if given."""
        keys = {"x25519": _pem(self._x, passphrase), "ed25519": _pem(self._sign, passphrase)}
        if self._mlkem is not None:
            keys["mlkem768"] = _pem(self._mlkem, passphrase)
        write_text_atomic(Path(path), json.dumps({"kind": "fed-llama-server-key", "kem": self.kem,
                                                  "keys": keys}, indent=2) + "\n", mode=0o600)

    @classmethod
    def load(cls, path: Path, passphrase: bytes | None = None) -> ServerKey:
        data = _read_json(path, "fed-llama-server-key")
        found = data.get("keys")
        keys: dict[str, Any] = found if isinstance(found, dict) else {}
        where = str(path)
        kem = str(data.get("kem"))
        return cls(kem, _unpem(keys.get("x25519"), x25519.X25519PrivateKey, passphrase, where),
                   _unpem(keys.get("ed25519"), ed25519.Ed25519PrivateKey, passphrase, where),
                   _unpem(keys.get("mlkem768"), mlkem.MLKEM768PrivateKey, passphrase, where)
                   if kem == "mlkem768-x25519" else None)


@dataclass
class TrustStore:
    """The sites the aggregator accepts updates from: site name -> Ed25519 public key."""

    sites: dict[str, SitePublicKey] = field(default_factory=dict)

    def enroll(self, key: SitePublicKey, *, replace: bool = False) -> None:
        """Add a site; a site already enrolled with another key needs ``replace=True``."""
        old = self.sites.get(key.site)
        if old is not None and old.raw != key.raw and not replace:
            raise Refused("bad-key", f"site {key.site!r} is already enrolled with key "
                          f"{old.fingerprint}; pass --replace to enroll key {key.fingerprint}")
        self.sites[key.site] = key

    def get(self, site: str) -> SitePublicKey:
        try:
            return self.sites[site]
        except KeyError:
            raise Refused("unknown-site", f"site {site!r} is not enrolled in the trust store: "
                          "enroll its public key with `fed-llama keys enroll`") from None

    def save(self, path: Path) -> None:
        data = {"kind": "fed-llama-trust-store",
                "sites": {s: k.to_json()["ed25519"] for s, k in sorted(self.sites.items())}}
        write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        data = _read_json(path, "fed-llama-trust-store")
        sites = data.get("sites")
        if not isinstance(sites, dict):
            raise Refused("bad-key", f"trust store {str(path)!r} has no 'sites' table")
        return cls({s: SitePublicKey(check_site_name(s), _unb64(v, f"{path} site {s!r}", 32))
                    for s, v in sites.items()})
