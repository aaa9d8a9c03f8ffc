"""``fed-llama keys init-tls`` / ``init-node``: the Deployment Engine's TLS and node-auth keys."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fed_llama.crypto import Refused
from fed_llama.crypto.transport import init_node, init_tls

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)


def test_the_superlink_certificate_is_signed_by_the_ca_for_its_hosts(tmp_path: Path) -> None:
    files = init_tls(tmp_path, ["link.hospital.example", "10.0.0.5"], days=30, now=NOW)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "link.hospital.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1",
                                                                            "10.0.0.5"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=30)
    assert cert.not_valid_before_utc <= NOW
    for private in (files.ca_key, files.key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_tls_files_are_never_overwritten_and_bad_hosts_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="'bad host' is neither an IP address nor a DNS name"):
        init_tls(tmp_path, ["bad host"])
    assert not (tmp_path / "tls").exists()
    files = init_tls(tmp_path)
    before = files.ca_cert.read_bytes()
    with pytest.raises(Refused, match="never overwritten"):
        init_tls(tmp_path)
    assert files.ca_cert.read_bytes() == before


def test_a_node_key_is_the_openssh_p384_key_flower_reads(tmp_path: Path) -> None:
    files = init_node(tmp_path, "cardiology")
    private = load_ssh_private_key(files.node_key("cardiology").read_bytes(), None)
    public = load_ssh_public_key(files.node_public("cardiology").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert public == private.public_key()
    assert stat.S_IMODE(files.node_key("cardiology").stat().st_mode) == 0o600
    with pytest.raises(Refused, match="never overwritten"):
        init_node(tmp_path, "cardiology")
    with pytest.raises(Refused, match="site name"):
        init_node(tmp_path, "../escape")
