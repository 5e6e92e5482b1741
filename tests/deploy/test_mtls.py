"""mTLS between services: a real grpc.aio server on port 0 that requires CA-signed client certs."""

from __future__ import annotations

import pathlib

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bulkhead_cli.certs import write_dev_certs
from shared.tls import (
    TlsConfig,
    TlsConfigError,
    channel_credentials,
    server_credentials,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A dev CA with service certs, plus a second, untrusted CA with its own 'identity' cert."""
    root = tmp_path_factory.mktemp("pki")
    write_dev_certs(root / "good", names=("identity", "client"))
    write_dev_certs(root / "rogue", names=("client", "identity"))
    return root


@pytest.fixture
async def tls_server(pki: pathlib.Path):
    """A health-only gRPC server that serves mTLS with the good CA; yields its port."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(TlsConfig.from_dir(pki / "good", "identity")))
    await server.start()
    yield port
    await server.stop(None)


async def _check(channel: grpc.aio.Channel) -> int:
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


async def test_client_with_ca_signed_cert_is_served(tls_server: int, pki: pathlib.Path) -> None:
    """A client presenting a certificate from the mesh CA gets an answer."""
    creds = channel_credentials(TlsConfig.from_dir(pki / "good", "client"))
    status = await _check(grpc.aio.secure_channel(f"localhost:{tls_server}", creds))
    assert status == health_pb2.HealthCheckResponse.SERVING


async def test_client_without_certificate_is_refused(tls_server: int, pki: pathlib.Path) -> None:
    """A client that trusts the CA but presents no certificate fails the handshake."""
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "good" / "ca.pem").read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _check(grpc.aio.secure_channel(f"localhost:{tls_server}", creds))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_with_cert_from_another_ca_is_refused(tls_server: int, pki: pathlib.Path) -> None:
    """A certificate signed by a different CA is not accepted, even with a matching name."""
    rogue = TlsConfig(
        ca=pki / "good" / "ca.pem", cert=pki / "rogue" / "client.pem", key=pki / "rogue" / "client-key.pem"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _check(grpc.aio.secure_channel(f"localhost:{tls_server}", channel_credentials(rogue)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_client_is_refused(tls_server: int) -> None:
    """An insecure channel cannot talk to an mTLS server."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _check(grpc.aio.insecure_channel(f"127.0.0.1:{tls_server}"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_refuses_server_from_another_ca(pki: pathlib.Path) -> None:
    """The client side verifies the server too: a server with a rogue certificate is rejected."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port(
        "127.0.0.1:0",
        server_credentials(
            TlsConfig(
                ca=pki / "good" / "ca.pem", cert=pki / "rogue" / "identity.pem", key=pki / "rogue" / "identity-key.pem"
            )
        ),
    )
    await server.start()
    try:
        creds = channel_credentials(TlsConfig.from_dir(pki / "good", "client"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(grpc.aio.secure_channel(f"localhost:{port}", creds))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_service_name_and_loopback_ip_are_valid_targets(tls_server: int, pki: pathlib.Path) -> None:
    """The certificate's SANs cover 127.0.0.1 and the Kubernetes service DNS name."""
    creds = channel_credentials(TlsConfig.from_dir(pki / "good", "client"))
    assert await _check(grpc.aio.secure_channel(f"127.0.0.1:{tls_server}", creds)) == 1
    k8s_name = (("grpc.ssl_target_name_override", "identity.bulkhead.svc.cluster.local"),)
    channel = grpc.aio.secure_channel(f"127.0.0.1:{tls_server}", creds, options=k8s_name)
    assert await _check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_tls_off_when_no_variable_is_set() -> None:
    """No BULKHEAD_TLS_* variable means plaintext (None), not an error."""
    assert TlsConfig.from_env({"BULKHEAD_IDENTITY_ADDR": "127.0.0.1:1"}) is None


def test_half_configured_tls_is_an_error() -> None:
    """Setting only some of the variables fails loudly instead of falling back to plaintext."""
    with pytest.raises(TlsConfigError, match="BULKHEAD_TLS_KEY"):
        TlsConfig.from_env({"BULKHEAD_TLS_CA": "/x/ca.pem", "BULKHEAD_TLS_CERT": "/x/a.pem"})


def test_env_round_trip(pki: pathlib.Path) -> None:
    """as_env() produces exactly what from_env() reads back."""
    cfg = TlsConfig.from_dir(pki / "good", "identity")
    assert TlsConfig.from_env(cfg.as_env()) == cfg


def test_unreadable_key_error_names_the_path_not_the_content(tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    """A missing file is reported by path; key material never appears in the message."""
    cfg = TlsConfig(ca=pki / "good" / "ca.pem", cert=pki / "good" / "identity.pem", key=tmp_path / "nope.pem")
    with pytest.raises(TlsConfigError) as err:
        server_credentials(cfg)
    assert "nope.pem" in str(err.value)
    key_pem = (pki / "good" / "identity-key.pem").read_text()
    assert "PRIVATE KEY" not in str(err.value) and key_pem not in repr(cfg)


async def test_production_server_with_mtls_serves_tenants_and_refuses_certless_clients(pki: pathlib.Path) -> None:
    """shared.server.serve with TLS: make_channel with a cert gets tenant calls through; without, refused."""
    from bulkhead.testing.v1 import echo_pb2, echo_pb2_grpc
    from shared.client import StaticCredentials, make_channel
    from shared.server import serve
    from testkit.echo import echo_binding
    from testkit.tokens import TestTokens

    tokens = TestTokens()
    running = await serve(
        name="echo",
        bindings=[echo_binding()],
        verifier=tokens.verifier,
        address="127.0.0.1:0",
        tls=TlsConfig.from_dir(pki / "good", "identity"),
    )
    try:
        creds = StaticCredentials(tokens.mint("t_alpha"), "t_alpha")
        async with make_channel(
            f"localhost:{running.port}", credentials=creds, tls=TlsConfig.from_dir(pki / "good", "client")
        ) as channel:
            reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest(message="hi"), timeout=5)
        assert reply.seen.tenant_id == "t_alpha"
        async with make_channel(f"127.0.0.1:{running.port}", credentials=creds) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await echo_pb2_grpc.EchoServiceStub(plaintext).Echo(echo_pb2.EchoRequest(message="hi"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        no_cert = grpc.ssl_channel_credentials(root_certificates=(pki / "good" / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{running.port}", no_cert) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await echo_pb2_grpc.EchoServiceStub(anonymous).Echo(
                    echo_pb2.EchoRequest(message="hi"), metadata=tokens.metadata("t_alpha"), timeout=5
                )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)
