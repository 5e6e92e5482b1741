"""`bulkhead certs dev`: the CA and service certificates it writes."""

from __future__ import annotations

import ipaddress
import pathlib
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from bulkhead_cli import certs


def _load(path: pathlib.Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_cli_writes_ca_and_one_cert_per_service(tmp_path: pathlib.Path, capsys) -> None:
    """`certs dev --out DIR` writes ca.pem and a cert + key for each of the six services."""
    assert certs.main(["certs", "dev", "--out", str(tmp_path)]) == 0
    for name in certs.SERVICES + certs.CLIENTS:
        assert (tmp_path / f"{name}.pem").is_file() and (tmp_path / f"{name}-key.pem").is_file()
    assert (tmp_path / "ca.pem").is_file()
    assert "PRIVATE KEY" not in capsys.readouterr().out


def test_keys_are_private_to_the_owner(tmp_path: pathlib.Path) -> None:
    """Every private key file, the CA's included, is mode 0600."""
    certs.write_dev_certs(tmp_path, names=("state",))
    for key in ("ca-key.pem", "state-key.pem"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600


def test_service_cert_names_and_usages(tmp_path: pathlib.Path) -> None:
    """A service cert covers loopback, compose and Kubernetes names and works as server and client."""
    certs.write_dev_certs(tmp_path, names=("credentials",), namespace="tenant-acme")
    cert = _load(tmp_path / "credentials.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) >= {
        "localhost",
        "credentials",
        "credentials.tenant-acme.svc",
        "credentials.tenant-acme.svc.cluster.local",
    }
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_leaf_is_signed_by_the_ca_and_the_ca_signs_only_leaves(tmp_path: pathlib.Path) -> None:
    """The service cert verifies under the CA's key; the CA has path length 0."""
    certs.write_dev_certs(tmp_path, names=("metering",))
    ca, leaf = _load(tmp_path / "ca.pem"), _load(tmp_path / "metering.pem")
    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)  # raises on a bad signature
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_each_run_makes_a_new_ca(tmp_path: pathlib.Path) -> None:
    """Two runs never share a CA key (no fixed or cached development key)."""
    certs.write_dev_certs(tmp_path / "a", names=())
    certs.write_dev_certs(tmp_path / "b", names=())
    assert (tmp_path / "a" / "ca-key.pem").read_bytes() != (tmp_path / "b" / "ca-key.pem").read_bytes()
