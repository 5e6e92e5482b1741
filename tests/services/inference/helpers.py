"""Helpers for the inference tests: a whole mesh (fake upstream, metering, credentials, proxy) on port 0."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import shutil
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2
from prometheus_client import CollectorRegistry

from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from bulkhead.inference.v1 import inference_pb2 as pb
from bulkhead.inference.v1 import inference_pb2_grpc
from bulkhead.metering.v1 import metering_pb2 as mpb
from bulkhead.metering.v1 import metering_pb2_grpc
from services.credentials.local_backend import LocalBackend
from services.credentials.master_key import load_or_create_master_key
from services.credentials.server import MIGRATIONS as CREDENTIALS_MIGRATIONS
from services.credentials.server import CredentialsService, serve_credentials
from services.inference.config import InferenceConfig
from services.inference.server import MIGRATIONS as INFERENCE_MIGRATIONS
from services.inference.server import InferenceService, start
from services.metering.server import MIGRATIONS as METERING_MIGRATIONS
from services.metering.server import MeteringService, serve_metering
from shared.client import make_channel
from shared.db import Database, TenantRouter, make_engine, normalize_url, upgrade
from shared.tiers import Tier, TierLookup
from shared.tokens import TokenVerifier
from testkit.fake_anthropic import FakeAnthropic
from testkit.tokens import TestTokens

PLATFORM_KEY = "sk-ant-platform-0123456789abcdef"
MODEL = "claude-test"
PINNED = "claude-test-20250101"
OPERATOR = "t_platform"


def user(text: str) -> pb.Message:
    """A user message with one text block."""
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=pb.TextBlock(text=text))])


def params(text: str = "hello there", *, model: str = MODEL, max_tokens: int = 50, **kw) -> pb.MessageParams:
    """Simple MessageParams."""
    return pb.MessageParams(model=model, messages=[user(text)], max_tokens=max_tokens, **kw)


class PooledTiers:
    """Identity's answer about the tenants TestTokens mints (all pooled), for meshes run without an identity."""

    async def tier_of(self, tenant_id: str) -> Tier:
        return Tier.POOLED


@dataclasses.dataclass
class Proxy:
    """One proxy replica and a stub to it."""

    service: InferenceService
    stub: inference_pb2_grpc.InferenceServiceAsyncStub
    channel: grpc.aio.Channel

    async def stop(self) -> None:
        """Stop the replica (settling leases and usage) and close the stub's channel."""
        await self.channel.close()
        await self.service.stop(grace=0)


@dataclasses.dataclass
class Mesh:
    """The fake upstream, metering, credentials and proxy replicas, sharing one token verifier."""

    tmp: Path
    tokens: TestTokens
    fake: FakeAnthropic
    metering: MeteringService
    credentials: CredentialsService
    metering_stub: metering_pb2_grpc.MeteringServiceAsyncStub
    credentials_stub: credentials_pb2_grpc.CredentialsServiceAsyncStub
    channels: list
    proxies: list[Proxy] = dataclasses.field(default_factory=list)
    env_overrides: dict = dataclasses.field(default_factory=dict)
    templates: Path | None = None
    verifier: TokenVerifier | None = None
    """What the services verify tokens with (None: tokens.verifier)."""
    tiers: TierLookup | None = dataclasses.field(default_factory=PooledTiers)
    """What the proxies ask a tenant's tier (None: identity at BULKHEAD_IDENTITY_ADDR, as in production)."""

    @property
    def stub(self) -> inference_pb2_grpc.InferenceServiceAsyncStub:
        """The first proxy replica's stub."""
        return self.proxies[0].stub

    @property
    def proxy(self) -> InferenceService:
        """The first proxy replica."""
        return self.proxies[0].service

    def md(self, tenant_id: str, scopes=("*",), **kw) -> tuple[tuple[str, str], ...]:
        """Call metadata for a tenant."""
        return self.tokens.metadata(tenant_id, scopes, **kw)

    def op(self) -> tuple[tuple[str, str], ...]:
        """Call metadata for a platform operator."""
        return self.tokens.metadata(OPERATOR, ("platform.operator",), principal_id="p_operator")

    def env(self, database: str = "inference.db") -> dict[str, str]:
        """The proxy's environment."""
        return {
            "BULKHEAD_DATA_DIR": str(self.tmp),
            "BULKHEAD_METERING_ADDR": self.metering.running.address,
            "BULKHEAD_CREDENTIALS_ADDR": self.credentials.running.address,
            "BULKHEAD_INFERENCE_DATABASE_URL": f"sqlite+aiosqlite:///{self.tmp / database}",
            "BULKHEAD_MODEL_PROVIDER": "anthropic",
            "ANTHROPIC_API_KEY": PLATFORM_KEY,
            "ANTHROPIC_BASE_URL": self.fake.base_url,
            "BULKHEAD_INFERENCE_ALLOWED_MODELS": f"{MODEL},claude-other",
            "BULKHEAD_INFERENCE_PINNED_VERSIONS": f"{MODEL}={PINNED}",
            "BULKHEAD_INFERENCE_DEFAULT_MODEL": MODEL,
            "BULKHEAD_INFERENCE_MAX_TOKENS_CEILING": "1000",
            "BULKHEAD_INFERENCE_MAX_RETRY_WAIT": "0.5",
            "BULKHEAD_INFERENCE_LEASE_TOKENS": "2000",
            "BULKHEAD_INFERENCE_ALLOW_HTTP_ENDPOINTS": "1",
            **self.env_overrides,
        }

    async def start_proxy(self, database: str = "inference.db", **kw) -> Proxy:
        """Start another proxy replica (on its own or a shared database file)."""
        config = InferenceConfig.from_env(self.env(database))
        if self.tiers is not None:
            kw.setdefault("tiers", self.tiers)
        if "db" not in kw:
            kw["db"] = await _open(self.tmp / database, INFERENCE_MIGRATIONS, self.templates)
        service = await start(config, self.verifier or self.tokens.verifier, address="127.0.0.1:0", **kw)
        channel = make_channel(service.running.address)
        proxy = Proxy(service, inference_pb2_grpc.InferenceServiceStub(channel), channel)
        self.proxies.append(proxy)
        return proxy

    async def stop_proxy(self, proxy: Proxy) -> None:
        """Stop one replica."""
        self.proxies.remove(proxy)
        await proxy.stop()

    async def put_tenant_key(self, tenant_id: str, key: str) -> None:
        """Store a tenant's own provider key in credentials."""
        await self.credentials_stub.PutSecret(
            credentials_pb2.PutSecretRequest(name="anthropic-api-key", value=key.encode()), metadata=self.md(tenant_id)
        )

    async def set_budget(self, tenant_id: str, tokens: int, **limits) -> None:
        """Give a tenant a hard token budget (and optional rate limits) in metering."""
        quota = mpb.Quota(
            tenant_id=tenant_id,
            budgets=[
                mpb.Budget(
                    unit=mpb.BUDGET_UNIT_TOKENS, limit=tokens, period=mpb.BUDGET_PERIOD_MONTH, mode=mpb.BUDGET_MODE_HARD
                )
            ],
            **limits,
        )
        await self.metering_stub.SetQuota(mpb.SetQuotaRequest(quota=quota), metadata=self.op())

    async def set_limits(self, tenant_id: str, **limits) -> None:
        """Give a tenant rate limits (no budget)."""
        await self.metering_stub.SetQuota(
            mpb.SetQuotaRequest(quota=mpb.Quota(tenant_id=tenant_id, **limits)), metadata=self.op()
        )

    async def metered(self, tenant_id: str) -> list[tuple[str, int, int, int, int]]:
        """Per-model token sums metering recorded for a tenant (model, events, input, output, cache r+w)."""
        start = timestamp_pb2.Timestamp()
        start.FromDatetime(dt.datetime(2000, 1, 1))
        end = timestamp_pb2.Timestamp()
        end.FromDatetime(dt.datetime(2100, 1, 1))
        resp = await self.metering_stub.QueryUsage(
            mpb.QueryUsageRequest(
                filter=mpb.UsageFilter(start_time=start, end_time=end), group_by=[mpb.USAGE_GROUPING_MODEL]
            ),
            metadata=self.md(tenant_id),
        )
        return [
            (
                r.model,
                r.event_count,
                r.tokens.input_tokens,
                r.tokens.output_tokens,
                r.tokens.cache_write_tokens + r.tokens.cache_read_tokens,
            )
            for r in resp.rows
        ]

    async def budget_status(self, tenant_id: str) -> mpb.BudgetStatus:
        """The tenant's token budget state."""
        resp = await self.metering_stub.GetQuotaStatus(mpb.GetQuotaStatusRequest(), metadata=self.md(tenant_id))
        return resp.budgets[0]

    async def settle(self) -> None:
        """Deliver queued usage and return idle leases on every replica."""
        for proxy in self.proxies:
            await proxy.service.proxy.close()
            await proxy.service.meter.flush()


def fake_totals(fake: FakeAnthropic, user_id: str) -> tuple[int, int, int]:
    """Calls, input and output tokens the fake reported for one opaque user id."""
    records = [r for r in fake.usage_log if r.user_id == user_id]
    return len(records), sum(r.usage["input_tokens"] for r in records), sum(r.usage["output_tokens"] for r in records)


def make_templates(directory: Path) -> Path:
    """Migrated, empty SQLite files of the three services (copied per test: migrations run once)."""
    for migrations in (METERING_MIGRATIONS, CREDENTIALS_MIGRATIONS, INFERENCE_MIGRATIONS):
        upgrade(f"sqlite+aiosqlite:///{directory / (migrations.parent.name + '.db')}", migrations)
    return directory


async def _open(path: Path, migrations: Path, templates: Path | None) -> Database:
    """A database at path: a copy of the migrated template when there is one, else migrated now.

    Either way the router knows the migrations, as in production: a bridge or silo tenant's own
    file is built with them on first use.
    """
    template = templates / (migrations.parent.name + ".db") if templates else None
    url = normalize_url(f"sqlite+aiosqlite:///{path}")
    if template is not None and template.exists() and not path.exists():
        shutil.copyfile(template, path)
        engine = make_engine(url)
        return Database(
            engine, router=TenantRouter(engine, url=url, owner_url=None, migrations=migrations, app_role=None)
        )
    return await Database.open(url, migrations=str(migrations))


async def start_mesh(
    tmp: Path,
    *,
    proxies: int = 1,
    delay: float = 0.0,
    templates: Path | None = None,
    verifier: TokenVerifier | None = None,
) -> Mesh:
    """Start everything; close with stop_mesh.

    verifier: what every service verifies tokens with (one over a real identity, say); by default
    the mesh's TestTokens, which then mint every token the tests send.
    """
    tokens = TestTokens()
    verifier = verifier or tokens.verifier
    fake = await FakeAnthropic(delay=delay).start()
    mdb = await _open(tmp / "metering.db", METERING_MIGRATIONS, templates)
    metering = await serve_metering(db=mdb, verifier=verifier, registry=CollectorRegistry(), price_cache_s=0)
    cdb = await _open(tmp / "credentials.db", CREDENTIALS_MIGRATIONS, templates)
    backend = LocalBackend(cdb, load_or_create_master_key(tmp / "master.key"))
    credentials = await serve_credentials(db=cdb, backend=backend, verifier=verifier)
    mch = make_channel(metering.running.address)
    cch = make_channel(credentials.running.address)
    mesh = Mesh(
        tmp,
        tokens,
        fake,
        metering,
        credentials,
        metering_pb2_grpc.MeteringServiceStub(mch),
        credentials_pb2_grpc.CredentialsServiceStub(cch),
        [mch, cch],
        templates=templates,
        verifier=verifier,
    )
    for _ in range(proxies):
        await mesh.start_proxy()
    return mesh


async def stop_mesh(mesh: Mesh) -> None:
    """Stop everything that start_mesh started."""
    for proxy in list(mesh.proxies):
        await mesh.stop_proxy(proxy)
    for channel in mesh.channels:
        await channel.close()
    await mesh.credentials.stop(grace=0)
    await mesh.metering.stop(grace=0)
    await mesh.fake.stop()
    await asyncio.sleep(0)
