"""`bulkhead certs dev --out DIR`: a development CA and one mTLS certificate per service.

Each service certificate is good both as a server and as a client certificate (services call
each other), and names the service the way every deployment here reaches it: ``localhost``,
``127.0.0.1``/``::1`` (``bulkhead up``), ``<svc>`` (compose) and ``<svc>.<namespace>.svc[...]``
(Kubernetes). Files: ``ca.pem``, ``ca-key.pem``, ``<name>.pem``, ``<name>-key.pem``; keys are 0600.
Point a service at them with ``shared.tls.TlsConfig.from_dir(DIR, name).as_env()``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("identity", "credentials", "state", "inference", "orchestrator", "metering")
"""The six services; each gets a certificate."""
CLIENTS = ("client",)
"""Callers outside the mesh (CLI, demo, the TypeScript test) that need a client certificate."""
DEFAULT_NAMESPACE = "bulkhead"


@dataclass(frozen=True)
class Issued:
    """Where one certificate and its key were written."""

    name: str
    """Service or client name, e.g. ``credentials``."""
    cert: pathlib.Path
    """PEM certificate."""
    key: pathlib.Path
    """PEM private key (mode 0600)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 rather than Ed25519: every gRPC TLS stack (BoringSSL, Node's OpenSSL) accepts it.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed


def _write_cert(path: pathlib.Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def dns_names(name: str, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """The DNS names a service is reached by: loopback, compose and Kubernetes service names."""
    return [
        "localhost",
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.cluster.local",
    ]


def make_ca(*, days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bulkhead dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Bulkhead development CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    name: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *, dns: Iterable[str], days: int = 365
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``name`` signed by the CA, usable as TLS server and client."""
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns)]
    sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bulkhead dev"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_dev_certs(
    out: str | os.PathLike[str],
    *,
    names: Sequence[str] = SERVICES + CLIENTS,
    namespace: str = DEFAULT_NAMESPACE,
    days: int = 365,
) -> list[Issued]:
    """Write a fresh CA and one certificate per name into ``out``; returns what was written."""
    root = pathlib.Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(days=days)
    _write_cert(root / "ca.pem", ca_cert)
    _write_key(root / "ca-key.pem", ca_key)
    issued = []
    for name in names:
        cert, key = make_leaf(name, ca_cert, ca_key, dns=dns_names(name, namespace), days=days)
        item = Issued(name=name, cert=root / f"{name}.pem", key=root / f"{name}-key.pem")
        _write_cert(item.cert, cert)
        _write_key(item.key, key)
        issued.append(item)
    return issued


def _run_dev(args: argparse.Namespace) -> int:
    issued = write_dev_certs(
        args.out, names=tuple(args.name or SERVICES + CLIENTS), namespace=args.namespace, days=args.days
    )
    print(f"CA:          {pathlib.Path(args.out) / 'ca.pem'}")
    for item in issued:
        print(f"{item.name + ':':<13}{item.cert}  (key {item.key.name})")
    print("Use with: BULKHEAD_TLS_CA=<ca.pem> BULKHEAD_TLS_CERT=<name>.pem BULKHEAD_TLS_KEY=<name>-key.pem")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``certs`` command group to the bulkhead CLI."""
    certs = subparsers.add_parser("certs", help="make TLS certificates for mTLS between services")
    sub = certs.add_subparsers(dest="certs_command", required=True)
    dev = sub.add_parser("dev", help="a development CA and one certificate per service")
    dev.add_argument("--out", required=True, type=pathlib.Path, help="folder to write PEM files into")
    dev.add_argument(
        "--name", action="append", help="certificate to make (repeatable; default: the six services and 'client')"
    )
    dev.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="Kubernetes namespace named in the certificates' DNS names"
    )
    dev.add_argument("--days", type=int, default=365, help="validity in days")
    dev.set_defaults(func=_run_dev)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the certs commands on their own (``python -m bulkhead_cli.certs dev --out DIR``)."""
    parser = argparse.ArgumentParser(prog="bulkhead")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
