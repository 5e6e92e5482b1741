"""`bulkhead demo`: two tenants, each with a team and a secret, run one workflow each, concurrently,
then show each tenant's usage and a refused cross-tenant attempt, and say where to look next."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from bulkhead.client import Client
from bulkhead.common.v1 import tenancy_pb2
from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.identity.v1 import identity_pb2 as idp
from bulkhead.metering.v1 import metering_pb2 as mtr
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orc
from shared.errors import error_details

SECRET_NAME = "crm_token"


class CrmStub:
    """A stand-in for a tenant's CRM on loopback: answers only with that tenant's own token."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}  # bearer token -> tenant name
        self.calls: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # http.server's name
                auth = self.headers.get("Authorization", "").removeprefix("Bearer ")
                tenant = stub.tokens.get(auth)
                stub.calls.append(tenant or "refused")
                body = (
                    {"account": f"{tenant} account", "plan": "gold", "open_tickets": 2}
                    if tenant
                    else {"error": "unauthorized"}
                )
                self.send_response(200 if tenant else 401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())

            def log_message(self, *args):  # keep the demo's terminal readable
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/account"

    def __enter__(self) -> CrmStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


def team_for(tenant_name: str, crm_url: str) -> orc.Team:
    """Triage hands off to a specialist, who looks the customer up in the CRM with the tenant's secret."""
    host = crm_url.split("/")[2]
    return orc.Team(
        name="support",
        description=f"{tenant_name}'s support desk",
        agents=[
            orc.Agent(
                name="triage",
                system_prompt=f"You triage support requests for {tenant_name}. "
                "Hand anything about an account to the specialist.",
                handoffs=["specialist"],
                max_steps=4,
            ),
            orc.Agent(
                name="specialist",
                system_prompt=f"You answer account questions for {tenant_name}, using the CRM lookup tool.",
                tools=["crm_lookup"],
                max_steps=4,
            ),
        ],
        http_tools=[
            orc.HttpTool(
                name="crm_lookup",
                description="Look up the customer's account in the CRM",
                method="GET",
                url=crm_url,
                headers={"Authorization": "Bearer ${secret:" + SECRET_NAME + "}"},
            )
        ],
        allowed_hosts=[host],
    )


@dataclass
class TenantRun:
    """What the demo did for one tenant."""

    name: str
    tenant_id: str
    api_key: str = field(repr=False)
    run_id: str = ""
    status: str = ""
    steps: list[str] = field(default_factory=list)
    trace_id: str = ""
    output: str = ""


TIERS = {"pooled": tenancy_pb2.TIER_POOLED, "bridge": tenancy_pb2.TIER_BRIDGE, "silo": tenancy_pb2.TIER_SILO}
"""The isolation tiers a demo tenant may have, by name."""


async def _setup_tenant(operator: Client, name: str, crm: CrmStub, addresses, tier: str) -> TenantRun:
    created = await operator.identity.CreateTenant(idp.CreateTenantRequest(name=name, tier=TIERS[tier]))
    tenant = TenantRun(name=name, tenant_id=created.tenant.id, api_key=created.admin_api_key)
    await operator.metering.SetQuota(
        mtr.SetQuotaRequest(
            quota=mtr.Quota(tenant_id=tenant.tenant_id, requests_per_minute=600, tokens_per_minute=200_000)
        )
    )
    crm_token = "crm-" + secrets.token_hex(12)
    crm.tokens[crm_token] = name
    async with await Client.connect(api_key=tenant.api_key, addresses=addresses) as bh:
        await bh.credentials.PutSecret(
            cred.PutSecretRequest(name=SECRET_NAME, value=crm_token.encode(), description="CRM API token")
        )
        await bh.orchestrator.CreateTeam(orc.CreateTeamRequest(team=team_for(name, crm.url)))
    return tenant


async def _run_workflow(tenant: TenantRun, addresses, say) -> None:
    tracer = trace.get_tracer("bulkhead.demo")
    async with await Client.connect(api_key=tenant.api_key, addresses=addresses) as bh:
        with tracer.start_as_current_span("demo.workflow", attributes={"tenant.id": tenant.tenant_id}) as span:
            tenant.trace_id = format(span.get_span_context().trace_id, "032x")
            started = await bh.orchestrator.StartRun(
                orc.StartRunRequest(
                    team="support",
                    entry_agent="triage",
                    input="My invoices look wrong; what plan am I on?",
                    idempotency_key=uuid.uuid4().hex,
                )
            )
            tenant.run_id = started.run.run_id
            # The orchestrator ends the stream once the run is finished; reading to its end also ends its span.
            async for event in bh.orchestrator.WatchRun(orc.WatchRunRequest(run_id=tenant.run_id)):
                if event.HasField("step"):
                    s = event.step
                    line = f"step {s.index:>2}  {s.agent:<10} {s.summary}"
                    tenant.steps.append(line)
                    say(f"  [{tenant.name}] {line}")
            final = await bh.orchestrator.GetRun(orc.GetRunRequest(run_id=tenant.run_id))
            tenant.status = orc.RunStatus.Name(final.run.status).removeprefix("RUN_STATUS_").lower()
            tenant.output = final.run.output
            if final.run.error_reason:
                say(f"  [{tenant.name}] run {tenant.status}: {final.run.error_reason}: {final.run.error_message}")


async def _usage(tenant: TenantRun, addresses) -> list[list[str]]:
    async with await Client.connect(api_key=tenant.api_key, addresses=addresses) as bh:
        now = int(time.time())
        window = mtr.UsageFilter(start_time=Timestamp(seconds=now - 3600), end_time=Timestamp(seconds=now + 60))
        resp = await bh.metering.QueryUsage(
            mtr.QueryUsageRequest(filter=window, group_by=[mtr.USAGE_GROUPING_AGENT, mtr.USAGE_GROUPING_MODEL])
        )
    return [
        [
            tenant.name,
            r.agent_id,
            r.model,
            str(r.event_count),
            str(r.tokens.input_tokens),
            str(r.tokens.output_tokens),
            r.cost_usd,
        ]
        for r in resp.rows
    ]


async def _settled_usage(tenants: list[TenantRun], addresses, *, timeout: float = 10.0) -> list[list[str]]:
    """Usage once the ledger stops moving: the proxy delivers its last events a moment after a run ends."""
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        rows = [row for t in tenants for row in await _usage(t, addresses)]
        if rows == previous or time.monotonic() > deadline:
            return rows
        previous = rows
        await asyncio.sleep(0.5)


async def _cross_tenant_attempt(a: TenantRun, b: TenantRun, addresses) -> list[str]:
    """A reads B's run by id, then claims B's tenant id with A's token: both refused."""
    lines = []
    async with await Client.connect(api_key=a.api_key, addresses=addresses) as bh:
        try:
            await bh.orchestrator.GetRun(orc.GetRunRequest(run_id=b.run_id))
            lines.append(f"!! {a.name} could read {b.name}'s run: isolation broken")
        except grpc.aio.AioRpcError as err:
            lines.append(f"{a.name} reads {b.name}'s run {b.run_id}: {err.code().name} ({err.details()})")
        token, _ = await bh.auth.current()
    async with grpc.aio.insecure_channel(addresses["orchestrator"]) as channel:
        from bulkhead.orchestrator.v1 import orchestrator_pb2_grpc

        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        try:
            await stub.ListRuns(
                orc.ListRunsRequest(), metadata=(("authorization", f"Bearer {token}"), ("x-tenant-id", b.tenant_id))
            )
            lines.append(f"!! {a.name}'s token listed {b.name}'s runs: isolation broken")
        except grpc.aio.AioRpcError as err:
            lines.append(
                f"{a.name}'s token sent as x-tenant-id={b.tenant_id}: {err.code().name} "
                f"({error_details(err)['reason']}, refused by the interceptor)"
            )
    return lines


@dataclass
class DemoResult:
    """Everything the demo printed, for tests."""

    tenants: list[TenantRun]
    usage: list[list[str]]
    refusals: list[str]
    crm_calls: list[str]


DEMO_PRICES = {"claude-sonnet-4-5-20250929": (3_000_000, 15_000_000, 3_750_000, 300_000)}
"""List prices (micro-USD per million tokens: input, output, cache write, cache read), so usage has a cost."""


async def _ensure_prices(operator: Client) -> None:
    for model, (inp, out, write, read) in DEMO_PRICES.items():
        listed = await operator.metering.ListPrices(mtr.ListPricesRequest(model=model))
        if not listed.prices:
            await operator.metering.SetPrice(
                mtr.SetPriceRequest(
                    price=mtr.Price(
                        model=model,
                        effective_time=Timestamp(seconds=int(time.time()) - 86400),
                        input_micros_per_mtok=inp,
                        output_micros_per_mtok=out,
                        cache_write_micros_per_mtok=write,
                        cache_read_micros_per_mtok=read,
                    )
                )
            )


async def run_demo(operator_key: str, addresses: dict[str, str], *, say=print, tier: str = "pooled") -> DemoResult:
    """The whole scenario, for two tenants of `tier`; `say` prints progress lines."""
    suffix = secrets.token_hex(3)
    with CrmStub() as crm:
        async with await Client.connect(api_key=operator_key, addresses=addresses) as operator:
            await _ensure_prices(operator)
            say(f"setting up two {tier} tenants, each with a support team and a CRM secret ...")
            tenants = [await _setup_tenant(operator, f"{n}-{suffix}", crm, addresses, tier) for n in ("acme", "globex")]
        for t in tenants:
            say(f"  {t.name:<14} {t.tenant_id}")
        say("\nrunning one workflow per tenant, concurrently (live steps):")
        await asyncio.gather(*(_run_workflow(t, addresses, say) for t in tenants))
        say("")
        usage = await _settled_usage(tenants, addresses)
        refusals = await _cross_tenant_attempt(tenants[0], tenants[1], addresses)
    return DemoResult(tenants, usage, refusals, list(crm.calls))
