"""HTTP integration tools: allowlisted hosts, per-tenant rate limit, secrets injected just in time.

What comes back to the model (and into the step log) is sanitised: a status and a bounded body
with every injected secret value scrubbed; never request headers, exception text or anything
about other tenants.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.orchestrator.ports import SecretSource, suspended_refusal
from services.orchestrator.ratelimit import RateLimiter
from services.orchestrator.team import SECRET_REF, HttpToolSpec, host_allowed, host_of
from shared.errors import Unavailable

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("bulkhead.orchestrator.http_tools")

REDACTED = "[redacted]"


@dataclass(frozen=True)
class ToolResult:
    """What a tool call gives back to the model."""

    text: str
    """The sanitised result."""
    is_error: bool = False
    """Whether the model should see this as a failure."""
    status: int = 0
    """HTTP status, 0 when no response."""


class HttpToolRunner:
    """Runs a team's HTTP tools for one tenant at a time (the tenant is passed per call)."""

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        client: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
        max_body_chars: int = 4000,
    ):
        """client: the HTTP client to use; None makes one (timeout, no redirects, no proxy from the
        environment) at the first tool call, so a replica whose teams call no HTTP tool never loads httpx
        (a few MB of every idle orchestrator)."""
        self._client, self._timeout, self._limiter, self._max_body = client, timeout, limiter, max_body_chars
        self._owns_client = client is None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False, trust_env=False)
        return self._client

    async def aclose(self) -> None:
        """Close the client this runner made (a client it was given stays its owner's)."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def call(
        self,
        tool: HttpToolSpec,
        tool_input: dict[str, Any],
        *,
        allowed_hosts: tuple[str, ...],
        secrets: SecretSource,
        tenant_id: str,
        run_id: str,
    ) -> ToolResult:
        """Call the tool and return a sanitised result; never raises for upstream failures."""
        result = await self._call(tool, tool_input, allowed_hosts, secrets, tenant_id)
        log.info(
            "http tool call",
            extra={
                "tenant_id": tenant_id,
                "run_id": run_id,
                "tool": tool.name,
                "host": host_of(tool.url),
                "status": result.status,
                "outcome": "error" if result.is_error else "ok",
            },
        )
        return result

    async def _call(
        self,
        tool: HttpToolSpec,
        tool_input: dict[str, Any],
        allowed_hosts: tuple[str, ...],
        secrets: SecretSource,
        tenant_id: str,
    ) -> ToolResult:
        if not host_allowed(tool.url, allowed_hosts):
            return ToolResult(f"tool {tool.name}: host {host_of(tool.url)} is not allowed for this team", True)
        wait = self._limiter.try_acquire(tenant_id)
        if wait is not None:
            return ToolResult(f"tool {tool.name}: rate limit reached, retry in {wait:.1f}s", True)
        try:
            resolved = await secrets.resolve({n: n for n in tool.secret_names()}) if tool.secret_names() else {}
        except Exception as exc:
            if suspended_refusal(exc) or isinstance(exc, Unavailable):
                raise  # not the tool's failure: the run pauses before this step and does it again later
            # Which secret failed and why stays in the credentials audit, not in what the model reads.
            return ToolResult(f"tool {tool.name}: a credential it needs is not available", True)
        values = list(resolved.values())
        headers = {
            name: SECRET_REF.sub(lambda m: resolved[m.group(1)], template)
            for name, template in dict(tool.headers).items()
        }
        import httpx  # loaded with the runner's client (see __init__)

        try:
            if tool.method == "GET":
                resp = await self._http().get(tool.url, params=_query(tool_input), headers=headers)
            else:
                resp = await self._http().post(tool.url, json=tool_input, headers=headers)
        except httpx.TimeoutException:
            return ToolResult(f"tool {tool.name}: the upstream did not answer in time", True)
        except httpx.HTTPError:
            return ToolResult(f"tool {tool.name}: the upstream could not be reached", True)
        finally:
            headers.clear()
            clear = getattr(resolved, "clear", None)
            if clear is not None:
                clear()  # the values live for this one call only
        body = _scrub(resp.text[: self._max_body * 2], values)[: self._max_body]
        if resp.is_redirect:
            return ToolResult(
                f"tool {tool.name}: the upstream answered with a redirect, not followed", True, resp.status_code
            )
        if resp.status_code >= 400:
            return ToolResult(
                f"tool {tool.name}: upstream returned HTTP {resp.status_code}: {body}", True, resp.status_code
            )
        return ToolResult(body, False, resp.status_code)


def _query(tool_input: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else str(v) for k, v in tool_input.items()}


def _scrub(text: str, values: list[str]) -> str:
    for v in sorted(filter(None, values), key=len, reverse=True):
        text = text.replace(v, REDACTED)
    return re.sub(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}", r"\1" + REDACTED, text)
