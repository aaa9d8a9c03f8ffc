"""Keys for Flower's Deployment Engine transport: TLS for the SuperLink, SuperNode auth keys.

These protect the connections (who may talk to the SuperLink, and that nobody on the network
reads the messages); the update envelopes protect the updates themselves end to end, even
from the SuperLink's operator. Layout, inside a key folder (see :mod:`fed_llama.crypto.keyring`)::

    tls/ca.crt            the federation's certificate authority (every party gets a copy)
    tls/ca.key            its private key (0600; keep it offline once certificates are made)
    tls/superlink.crt     the SuperLink's certificate, signed by the CA, for its host names
    tls/superlink.key     its private key (0600; the SuperLink's host only)
    nodes/<site>.key      a SuperNode's authentication key (0600; OpenSSH, EC P-384: the
                          format and curve Flower reads, without a passphrase)
    nodes/<site>.pub      its public key, registered with ``flwr supernode register``

Times are injectable (``now``) for tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fed_llama.common.files import write_bytes_atomic
from fed_llama.crypto.keys import check_site_name
from fed_llama.crypto.refusal import Refused

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
"""Names the SuperLink's certificate always covers (a loopback test or a one-host trial)."""


@dataclass(frozen=True)
class TlsFiles:
    """The TLS files of a key folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "tls" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "tls" / "ca.key"

    @property
    def cert(self) -> Path:
        return self.root / "tls" / "superlink.crt"

    @property
    def key(self) -> Path:
        return self.root / "tls" / "superlink.key"

    def node_key(self, site: str) -> Path:
        return self.root / "nodes" / f"{site}.key"

    def node_public(self, site: str) -> Path:
        return self.root / "nodes" / f"{site}.pub"


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > 253 or not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum()
            and not label.startswith("-") for label in labels):
        raise Refused("bad-key", f"--host {host!r} is neither an IP address nor a DNS name: "
                      "give the name or address the SuperNodes will connect to")
    return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_tls(root: Path, hosts: Sequence[str] = (), *, days: int = 365,
             now: datetime.datetime | None = None) -> TlsFiles:
    """Make a CA and a SuperLink certificate for ``hosts`` (plus localhost and 127.0.0.1).

    Refuses to overwrite existing TLS files, and checks every host name before writing any.
    """
    files = TlsFiles(root)
    existing = [p for p in (files.ca_cert, files.ca_key, files.cert, files.key) if p.exists()]
    if existing:
        raise Refused("bad-key", f"{existing[0]} exists: TLS files are never overwritten; "
                      "choose another folder")
    if days < 1:
        raise Refused("bad-key", f"--days must be at least 1; got {days}")
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    sans = [_san(h) for h in names]
    start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fed-llama federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    write_bytes_atomic(files.ca_key, _pem_key(ca_key), 0o600)
    write_bytes_atomic(files.key, _pem_key(key), 0o600)
    write_bytes_atomic(files.cert, cert.public_bytes(pem))
    write_bytes_atomic(files.ca_cert, ca.public_bytes(pem))  # last: its presence means done
    return files


def init_node(root: Path, site: str) -> TlsFiles:
    """Make ``site``'s SuperNode authentication key pair (EC P-384, OpenSSH format)."""
    files = TlsFiles(root)
    check_site_name(site)
    if files.node_key(site).exists():
        raise Refused("bad-key", f"{files.node_key(site)} exists: keys are never overwritten; "
                      "choose another folder")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    write_bytes_atomic(files.node_key(site), private, 0o600)
    write_bytes_atomic(files.node_public(site), public + f" {site}\n".encode())
    return files
