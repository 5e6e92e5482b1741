"""JSON logs carry service, tenant, request and trace ids, and never a token or a registered secret."""

from __future__ import annotations

import io
import json
import logging

import pytest

from shared.logs import register_secret, scrub, setup_logging
from shared.tenancy import TenantContext, tenant_scope


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("testsvc", "INFO", stream=stream)
    yield stream
    root.handlers[:], root.level = saved


def test_log_line_is_json_with_tenant_and_request(log_stream):
    """Inside a tenant's request, each line names the service, tenant and request id."""
    with tenant_scope(TenantContext(tenant_id="t_a", principal_id="p", request_id="r-9")):
        logging.getLogger("x").info("hello %s", "world")
    line = json.loads(log_stream.getvalue().splitlines()[-1])
    assert line["service"] == "testsvc" and line["message"] == "hello world"
    assert line["tenant_id"] == "t_a" and line["request_id"] == "r-9"


def test_tokens_keys_and_registered_secrets_are_scrubbed(log_stream):
    """Bearer tokens, JWTs, Bulkhead API keys and registered secret values never reach the output."""
    secret = "sf-password-8c1e77"
    register_secret(secret)
    jwt_like = "eyJhbGciOiJFZERTQSJ9.eyJ0aWQiOiJ0X2EifQ.c2lnbmF0dXJlc2lnbmF0dXJl"
    api_key = "bk_t_abc123_k_def456_" + "a" * 48
    log = logging.getLogger("x")
    log.warning("auth failed for Bearer %s", jwt_like)
    log.info("key %s and secret %s", api_key, secret, extra={"detail": f"value={secret}"})
    try:
        raise ValueError(f"bad secret {secret}")
    except ValueError:
        log.exception("boom")
    out = log_stream.getvalue()
    for leaked in (secret, jwt_like, api_key):
        assert leaked not in out
    assert out.count("[REDACTED]") >= 4


def test_scrub_leaves_ordinary_text_alone():
    """Plain words are not redacted."""
    assert scrub("tenant t_a appended 3 events") == "tenant t_a appended 3 events"
