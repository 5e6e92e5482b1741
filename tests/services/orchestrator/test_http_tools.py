"""HTTP tools: allowlist, rate limit, secret injection and sanitised errors."""

from __future__ import annotations

import logging

import httpx
import pytest

from services.orchestrator.http_tools import HttpToolRunner
from services.orchestrator.ratelimit import RateLimiter
from services.orchestrator.team import HttpToolSpec

from .fakes import DictSecrets, ToolServer

SECRET = "tok-9d8e7f6a5b4c"


@pytest.fixture
def server():
    s = ToolServer()
    yield s
    s.close()


def runner(rate: float = 100, burst: int = 100) -> HttpToolRunner:
    return HttpToolRunner(client=httpx.AsyncClient(timeout=5), limiter=RateLimiter(rate, burst))


def tool(host: str, **kw) -> HttpToolSpec:
    return HttpToolSpec(name="lookup", url=f"http://{host}/x", headers={"x-api-key": "${secret:api}"}, **kw)


async def test_post_with_injected_secret(server):
    """POST sends the input as JSON and the resolved secret as a header."""
    res = await runner().call(
        tool(server.host, method="POST"),
        {"q": 1},
        allowed_hosts=(server.host,),
        secrets=DictSecrets({"api": SECRET}),
        tenant_id="t_a",
        run_id="r",
    )
    assert not res.is_error and res.status == 200 and "paid" in res.text
    assert server.requests[0]["headers"]["x-api-key"] == SECRET and server.requests[0]["body"] == '{"q":1}'


async def test_host_not_allowed_is_never_contacted(server):
    """A host off the allowlist is refused before any request or secret lookup."""
    secrets = DictSecrets({"api": SECRET})
    res = await runner().call(
        tool(server.host), {}, allowed_hosts=("example.com",), secrets=secrets, tenant_id="t_a", run_id="r"
    )
    assert res.is_error and "not allowed" in res.text
    assert server.requests == [] and secrets.asked == []


async def test_rate_limit_is_per_tenant(server):
    """Tenant A's burst is exhausted; tenant B still gets through."""
    r = runner(rate=0.001, burst=2)
    s = DictSecrets({"api": SECRET})
    outcomes = [
        (
            await r.call(tool(server.host), {}, allowed_hosts=(server.host,), secrets=s, tenant_id="t_a", run_id="r")
        ).is_error
        for _ in range(3)
    ]
    assert outcomes == [False, False, True]
    assert not (
        await r.call(tool(server.host), {}, allowed_hosts=(server.host,), secrets=s, tenant_id="t_b", run_id="r")
    ).is_error
    assert len(server.requests) == 3


async def test_upstream_error_is_sanitised(server, caplog):
    """A 500 whose body echoes the credential reaches the model with the value redacted; logs are clean."""
    caplog.set_level(logging.DEBUG)
    server.status, server.body = 500, f'{{"error": "bad key {SECRET}", "auth": "Bearer {SECRET}"}}'
    res = await runner().call(
        tool(server.host),
        {},
        allowed_hosts=(server.host,),
        secrets=DictSecrets({"api": SECRET}),
        tenant_id="t_a",
        run_id="r",
    )
    assert res.is_error and res.status == 500 and "HTTP 500" in res.text
    assert SECRET not in res.text and "[redacted]" in res.text
    assert SECRET not in caplog.text
    assert any(
        getattr(r, "outcome", None) == "error" and getattr(r, "tenant_id", None) == "t_a" for r in caplog.records
    )


async def test_unreachable_and_missing_secret_are_plain_errors(server):
    """Connection failures and unavailable credentials give short messages without internals."""
    port = server.port
    server.close()
    res = await runner().call(
        tool(f"127.0.0.1:{port}"),
        {},
        allowed_hosts=(f"127.0.0.1:{port}",),
        secrets=DictSecrets({"api": SECRET}),
        tenant_id="t_a",
        run_id="r",
    )
    assert res.is_error and res.text == "tool lookup: the upstream could not be reached"
    res = await runner().call(
        tool(f"127.0.0.1:{port}"),
        {},
        allowed_hosts=(f"127.0.0.1:{port}",),
        secrets=DictSecrets({}),
        tenant_id="t_a",
        run_id="r",
    )
    assert res.text == "tool lookup: a credential it needs is not available"


async def test_a_runner_without_a_client_makes_its_own_at_the_first_call_and_closes_it(server):
    """The service's runner makes its client on first use (an orchestrator whose teams call no HTTP tool
    never loads httpx); it refuses redirects like a given client, and aclose() closes what it made."""
    r = HttpToolRunner(limiter=RateLimiter(100, 100), timeout=5)
    assert r._client is None
    res = await r.call(
        tool(server.host, method="POST"),
        {"q": 2},
        allowed_hosts=(server.host,),
        secrets=DictSecrets({"api": SECRET}),
        tenant_id="t_a",
        run_id="r",
    )
    assert not res.is_error and res.status == 200 and server.requests[0]["body"] == '{"q":2}'
    made = r._client
    assert made is not None and not made.follow_redirects and made.timeout.read == 5
    await r.aclose()
    assert made.is_closed and r._client is None
