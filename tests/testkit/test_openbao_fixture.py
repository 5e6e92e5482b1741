"""The OpenBao dev-server fixture: KV v2, namespaces, restart on the same address, no token leaks."""

from __future__ import annotations

import secrets
import socket
import time
import urllib.parse

import hvac
import hvac.exceptions
import pytest
import requests

from testkit.openbao import OpenBaoServer


def test_kv_v2_write_then_read(openbao: OpenBaoServer) -> None:
    """The dev server comes with KV v2 at secret/ and the root token can use it."""
    client = openbao.client()
    path = f"harness/{secrets.token_hex(4)}"
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"api_key": "v1"})
    read = client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)
    assert read["data"]["data"] == {"api_key": "v1"}
    assert read["data"]["metadata"]["version"] == 1


def test_wrong_token_is_refused(openbao: OpenBaoServer) -> None:
    """A made-up token is refused, so the server really checks tokens."""
    client = openbao.client(token="not-the-root-token")
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version(path="anything", raise_on_deleted_version=True)


def test_namespaces_isolate_secrets(openbao: OpenBaoServer) -> None:
    """OpenBao namespaces work here: a secret written in one is invisible from root and others."""
    root = openbao.client()
    ns_a, ns_b = f"harness_a_{secrets.token_hex(3)}", f"harness_b_{secrets.token_hex(3)}"
    for ns in (ns_a, ns_b):
        root.adapter.post(f"/v1/sys/namespaces/{ns}")
        openbao.client(namespace=ns).sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    in_a = openbao.client(namespace=ns_a)
    in_a.secrets.kv.v2.create_or_update_secret(path="db", secret={"password": "only-in-a"})
    assert in_a.secrets.kv.v2.read_secret_version(path="db", raise_on_deleted_version=True)["data"]["data"] == {
        "password": "only-in-a"
    }
    for other in (openbao.client(namespace=ns_b), root):
        with pytest.raises(hvac.exceptions.InvalidPath):
            other.secrets.kv.v2.read_secret_version(path="db", raise_on_deleted_version=True)
    listed = root.adapter.list("/v1/sys/namespaces")["data"]["keys"]
    assert {f"{ns_a}/", f"{ns_b}/"} <= set(listed)


def test_stop_refuses_connections_then_start_comes_back_empty(openbao: OpenBaoServer) -> None:
    """stop() closes the port; start() is healthy on the same URL and token, with data gone."""
    client = openbao.client()
    client.secrets.kv.v2.create_or_update_secret(path="harness/restart", secret={"x": "1"})
    url_before = openbao.url
    openbao.stop()
    try:
        assert not openbao.healthy()
        port = urllib.parse.urlsplit(openbao.url).port
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        with pytest.raises(requests.exceptions.ConnectionError):
            client.secrets.kv.v2.read_secret_version(path="harness/restart", raise_on_deleted_version=True)
    finally:
        openbao.start()
    assert openbao.url == url_before
    assert openbao.healthy()
    assert client.is_authenticated()  # same root token still works
    with pytest.raises(hvac.exceptions.InvalidPath):  # dev mode: nothing survives a restart
        client.secrets.kv.v2.read_secret_version(path="harness/restart", raise_on_deleted_version=True)
    client.secrets.kv.v2.create_or_update_secret(path="harness/restart", secret={"x": "2"})


def test_root_token_stays_out_of_log_and_repr(openbao: OpenBaoServer) -> None:
    """The root token goes in by environment: not in the server log, not in the fixture's repr."""
    text = ""
    for _ in range(100):  # the dev banner is printed just after the server turns healthy
        with open(openbao.log_path) as log:
            text = log.read()
        if "Root Token:" in text:
            break
        time.sleep(0.1)
    assert "Root Token: [redacted]" in text  # the banner was written, minus the token
    leaked_in_log = openbao.root_token in text
    leaked_in_repr = openbao.root_token in repr(openbao)
    assert (leaked_in_log, leaked_in_repr) == (False, False)
