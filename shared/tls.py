"""Mutual TLS between services: one CA, a certificate per service, client certificates required.

TLS is off unless all three of ``BULKHEAD_TLS_CA``, ``BULKHEAD_TLS_CERT`` and ``BULKHEAD_TLS_KEY``
are set; setting only some of them is a configuration error rather than a silent fallback to
plaintext. ``bulkhead certs dev --out DIR`` makes a development CA and service certificates.

A service reads these from the environment it was given (``ServiceConfig.tls``) and hands the config
to ``shared.server.serve`` and ``shared.client.make_channel``; only callers that pass none (the CLI,
tests) get the process environment's (``TLS_FROM_ENV``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from shared.config import ConfigError

ENV_CA = "BULKHEAD_TLS_CA"
ENV_CERT = "BULKHEAD_TLS_CERT"
ENV_KEY = "BULKHEAD_TLS_KEY"
ENV_VARS = (ENV_CA, ENV_CERT, ENV_KEY)


TLS_FROM_ENV = object()
"""Default of serve()/make_channel()'s `tls`: read BULKHEAD_TLS_* from the process environment."""


class TlsConfigError(ConfigError):
    """The TLS environment is incomplete or names files that cannot be read."""


@dataclass(frozen=True)
class TlsConfig:
    """Where this process finds its CA bundle, certificate and private key (PEM files)."""

    ca: pathlib.Path
    """CA certificate(s) that peers' certificates must chain to."""
    cert: pathlib.Path
    """This process's certificate chain, presented both as server and as client."""
    key: pathlib.Path
    """The private key of ``cert``; read only when credentials are built, never logged."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsConfig | None:
        """Read the three BULKHEAD_TLS_* paths; None when none is set (plaintext)."""
        env = os.environ if env is None else env
        values = {name: env.get(name, "").strip() for name in ENV_VARS}
        present = [name for name, value in values.items() if value]
        if not present:
            return None
        if len(present) != len(ENV_VARS):
            missing = ", ".join(name for name in ENV_VARS if name not in present)
            raise TlsConfigError(f"TLS is half-configured: also set {missing}")
        return cls(
            ca=pathlib.Path(values[ENV_CA]), cert=pathlib.Path(values[ENV_CERT]), key=pathlib.Path(values[ENV_KEY])
        )

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], name: str) -> TlsConfig:
        """The config for service ``name`` inside a ``bulkhead certs dev`` output folder."""
        root = pathlib.Path(directory)
        return cls(ca=root / "ca.pem", cert=root / f"{name}.pem", key=root / f"{name}-key.pem")

    def as_env(self) -> dict[str, str]:
        """The environment variables that reproduce this config (for child processes)."""
        return {ENV_CA: str(self.ca), ENV_CERT: str(self.cert), ENV_KEY: str(self.key)}


def _read(path: pathlib.Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        # The path is configuration, not a secret; the file's content never reaches the message.
        raise TlsConfigError(f"cannot read TLS {what} {path}: {exc.strerror}") from None


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    """Server credentials that present ``cfg.cert`` and refuse clients without a CA-signed cert."""
    return grpc.ssl_server_credentials(
        [(_read(cfg.key, "key"), _read(cfg.cert, "certificate"))],
        root_certificates=_read(cfg.ca, "CA"),
        require_client_auth=True,
    )


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials:
    """Channel credentials that verify the server against ``cfg.ca`` and present ``cfg.cert``."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(cfg.ca, "CA"),
        private_key=_read(cfg.key, "key"),
        certificate_chain=_read(cfg.cert, "certificate"),
    )
