"""Per-tenant OpenBao clients: provision the tenant's mounts, key and policy with the service's
privileged token, then mint a SHORT-LIVED token carrying only the tenant's policy and reuse it
until it nears expiry. Everything a tenant call does uses that token, so a bug in our code still
cannot read another tenant's path: OpenBao itself refuses.

Runs in worker threads (hvac is synchronous); a lock guards the cache.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import hvac
import requests

from services.credentials.backend import TenantRef
from services.credentials.vault_layout import VaultLayout


@dataclass(slots=True)
class _Minted:
    client: hvac.Client
    token: str
    refresh_at: float


class TenantTokens:
    """Mints, caches and refreshes one token per tenant (silo tenants: inside their namespace)."""

    def __init__(
        self,
        url: str,
        admin_token: str,
        *,
        layout: VaultLayout,
        ttl_seconds: int,
        timeout: float,
        session: requests.Session,
        clock=time.monotonic,
    ) -> None:
        self._url, self._admin_token = url, admin_token
        self._layout, self._ttl, self._timeout, self._session = layout, ttl_seconds, timeout, session
        self._clock = clock
        self._lock = threading.Lock()
        # Per tenant and namespace: a migration into or out of silo changes the namespace of its calls.
        self._minted: dict[tuple[str, str | None], _Minted] = {}
        self._ready_namespaces: set[str | None] = set()
        self._ready_tenants: set[tuple[str, str | None]] = set()
        self.minted_count = 0
        """How many tokens were minted (tests check that tokens are reused)."""

    def client_for(self, tenant: TenantRef) -> hvac.Client:
        """An hvac client holding the tenant's own token (provisioning on first use)."""
        return self._get(tenant).client

    def token_for(self, tenant: TenantRef) -> str:
        """The tenant's current token (for isolation tests that call OpenBao directly)."""
        return self._get(tenant).token

    def cached_token(self, tenant: TenantRef) -> str | None:
        """The tenant's token if one is minted and not yet due for refresh; never provisions or
        waits (the event loop's read path calls it; None sends the read through client_for)."""
        minted = self._minted.get(self._key(tenant))
        return minted.token if minted is not None and self._clock() < minted.refresh_at else None

    def forget(self, tenant: TenantRef) -> None:
        """Drop the tenant's token and provisioning state (after OpenBao refused it, e.g. a restart)."""
        with self._lock:
            self._minted.pop(self._key(tenant), None)
            self._ready_tenants.discard(self._key(tenant))
            self._ready_namespaces.discard(self._layout.namespace(tenant))
            self._ready_namespaces.discard(None)

    def _key(self, tenant: TenantRef) -> tuple[str, str | None]:
        return tenant.tenant_id, self._layout.namespace(tenant)

    def provision(self, tenant: TenantRef) -> None:
        """Make the tenant's namespace (silo), mounts, Transit key and policy exist (a migration's target)."""
        with self._lock:
            self._provision(tenant)

    def _get(self, tenant: TenantRef) -> _Minted:
        with self._lock:
            minted = self._minted.get(self._key(tenant))
            if minted is not None and self._clock() < minted.refresh_at:
                return minted
            self._provision(tenant)
            minted = self._mint(tenant)
            self._minted[self._key(tenant)] = minted
            return minted

    def admin(self, namespace: str | None) -> hvac.Client:
        """A client with the service's privileged token (tenant deletion only: see purge.py)."""
        return self._admin(namespace)

    def _admin(self, namespace: str | None) -> hvac.Client:
        return hvac.Client(
            url=self._url,
            token=self._admin_token,
            namespace=namespace,
            timeout=self._timeout,  # type: ignore[arg-type]  # types-hvac: int; requests: float
            session=self._session,
        )

    def _provision(self, tenant: TenantRef) -> None:
        """Idempotently create namespace, mounts, Transit key and policy for the tenant."""
        ns = self._layout.namespace(tenant)
        if ns is not None and ns not in self._ready_namespaces:
            self._admin(None).sys.create_namespace(ns)  # idempotent in OpenBao
        admin = self._admin(ns)
        if ns not in self._ready_namespaces:
            mounts = admin.sys.list_mounted_secrets_engines()["data"]
            if f"{self._layout.kv_mount}/" not in mounts:
                admin.sys.enable_secrets_engine("kv", path=self._layout.kv_mount, options={"version": "2"})
            if f"{self._layout.transit_mount}/" not in mounts:
                admin.sys.enable_secrets_engine("transit", path=self._layout.transit_mount)
            self._ready_namespaces.add(ns)
        if self._key(tenant) not in self._ready_tenants:
            admin.secrets.transit.create_key(
                self._layout.key_name(tenant), key_type="aes256-gcm96", mount_point=self._layout.transit_mount
            )
            admin.sys.create_or_update_policy(self._layout.policy_name(tenant), self._layout.policy(tenant))
            self._ready_tenants.add(self._key(tenant))

    def _mint(self, tenant: TenantRef) -> _Minted:
        ns = self._layout.namespace(tenant)
        auth = self._admin(ns).auth.token.create(
            policies=[self._layout.policy_name(tenant)],
            ttl=f"{self._ttl}s",
            renewable=False,
            no_default_policy=True,
            display_name=f"tenant-{tenant.tenant_id}",
            meta={"tenant": tenant.tenant_id},
        )["auth"]
        self.minted_count += 1
        ttl = float(auth["lease_duration"] or self._ttl)
        # Refresh with a quarter of the lifetime left, so a call never carries an expiring token.
        refresh_at = self._clock() + ttl * 0.75
        client = hvac.Client(
            url=self._url,
            token=auth["client_token"],
            namespace=ns,
            timeout=self._timeout,  # type: ignore[arg-type]  # types-hvac: int; requests: float
            session=self._session,
        )
        return _Minted(client, auth["client_token"], refresh_at)
