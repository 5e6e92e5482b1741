"""The `vault` backend: KV v2 values and Transit keys in OpenBao/Vault, each call made with the
tenant's own short-lived token (see vault_tokens). hvac is synchronous, so calls run in threads.

The address may list several nodes of one OpenBao Raft cluster (`http://a:8200,http://b:8200`).
Any unsealed node serves every request (a standby forwards it to the active node), so the
backend sticks to one node and moves to the next only when a request provably did nothing there
(see _FailoverSession); everything else surfaces as UNAVAILABLE for the caller to retry.
"""

from __future__ import annotations

import asyncio
import base64
import re
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import hvac
import hvac.exceptions as vx
import requests
import urllib3.exceptions

from services.credentials.backend import (
    DataKey,
    StoredValue,
    TenantRef,
    cas_mismatch,
    decryption_failed,
)
from services.credentials.vault_layout import VaultLayout
from services.credentials.vault_read import KvReader
from services.credentials.vault_tokens import TenantTokens
from shared import errors

T = TypeVar("T")
_DOWN = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    vx.VaultDown,
    vx.InternalServerError,
    vx.BadGateway,
)
_KEY_VERSION = re.compile(rb"^vault:v(\d+):")


def _unavailable() -> errors.Unavailable:
    return errors.Unavailable(
        "the secret manager (OpenBao) is unreachable or sealed; nothing was changed, retry later",
        reason="SECRET_MANAGER_UNAVAILABLE",
        retry_after=1.0,
    )


def split_addresses(addresses: str | Sequence[str]) -> list[str]:
    """The node URLs of a comma-separated address list (or a list), without trailing slashes."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    urls = [u.strip().rstrip("/") for u in items if u.strip()]
    if not urls:
        raise ValueError("no OpenBao address given")
    return urls


def _not_processed(exc: requests.exceptions.RequestException) -> bool:
    """Whether the request failed before any node could act on it, so another node may get it.

    A refused or timed-out connect sent nothing. A standby whose leader just died answers 307
    towards that leader; following it fails to connect as well, and the standby did nothing.
    A read timeout or a reset after sending may hide a write that happened: not retried here.
    """
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", exc.args[0])
        return isinstance(reason, urllib3.exceptions.ConnectTimeoutError)  # NewConnectionError too
    return False


class _FailoverSession(requests.Session):
    """A requests session that sends each request to the node that last answered, and to the
    next node only when the request provably did nothing (connect refused, sealed: 503).

    hvac builds URLs on the first address; this session swaps in the node in use. Redirects are
    still followed (requests keeps the method, body and X-Vault-Token on a 307).
    """

    def __init__(self, urls: list[str]) -> None:
        super().__init__()
        self.urls = urls
        self._current = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        """The node requests go to first."""
        return self.urls[self._current]

    def request(self, method, url, *args, **kwargs):  # requests' signature
        base = next((u for u in self.urls if url == u or url.startswith(u + "/")), None)
        if base is None or len(self.urls) == 1:
            return super().request(method, url, *args, **kwargs)
        start = self._current
        last: requests.Response | Exception | None = None
        for step in range(len(self.urls)):
            index = (start + step) % len(self.urls)
            try:
                resp = super().request(method, self.urls[index] + url[len(base) :], *args, **kwargs)
            except requests.exceptions.RequestException as exc:
                if not _not_processed(exc):
                    self._move_from(index)  # the next call tries elsewhere; this one fails
                    raise
                last = exc
                continue
            if resp.status_code == 503:  # sealed, or no active node: nothing was done there
                last = resp
                continue
            self._stick(index)
            return resp
        if isinstance(last, requests.Response):
            return last
        raise last  # type: ignore[misc]  # every node refused: ConnectionError -> UNAVAILABLE

    def _stick(self, index: int) -> None:
        with self._lock:
            self._current = index

    def _move_from(self, index: int) -> None:
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % len(self.urls)


def _session_for(urls: list[str]) -> _FailoverSession:
    """A requests session for OpenBao with the environment's proxy and CA settings resolved once.

    requests otherwise re-reads the environment (proxies, CA bundle, netrc) on every call, about
    0.2 ms of CPU here.
    """
    session = _FailoverSession(urls)
    settings = session.merge_environment_settings(urls[0], {}, None, None, None)
    session.proxies.update(settings["proxies"])
    session.verify = settings["verify"]
    session.trust_env = False
    return session


def _key_version(ciphertext: bytes) -> int:
    match = _KEY_VERSION.match(ciphertext)
    return int(match.group(1)) if match else 0


class VaultBackend:
    """SecretBackend and KeyBackend over OpenBao/Vault."""

    name = "vault"

    def __init__(
        self,
        url: str | Sequence[str],
        admin_token: str,
        *,
        layout: VaultLayout | None = None,
        token_ttl_seconds: int = 900,
        timeout: float = 5.0,
        placed_tier: Callable[[str, str], str] | None = None,
    ) -> None:
        """url: one OpenBao address, or several nodes of one cluster (comma-separated or a list).
        placed_tier: (tenant id, its token's tier claim) -> the tier that routes it (the database router's,
        which follows tier migrations): a silo tenant's namespace is picked by it, never by the claim."""
        self._placed_tier = placed_tier
        urls = split_addresses(url)
        self._session = _session_for(urls)
        self.layout = layout or VaultLayout()
        self.tokens = TenantTokens(
            urls[0],
            admin_token,
            layout=self.layout,
            ttl_seconds=token_ttl_seconds,
            timeout=timeout,
            session=self._session,
        )
        self._reader = KvReader(self._session, self.tokens, self.layout, timeout=timeout)

    @property
    def current_address(self) -> str:
        """The OpenBao node requests go to first (the one that answered last)."""
        return self._session.current

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._reader.close()
        self._session.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _placed(self, tenant: TenantRef) -> TenantRef:
        if self._placed_tier is None:
            return tenant
        tier = self._placed_tier(tenant.tenant_id, tenant.tier) or tenant.tier
        return tenant if tier == tenant.tier else TenantRef(tenant.tenant_id, tier)

    async def _run(self, tenant: TenantRef, op: Callable[[hvac.Client], T]) -> T:
        return await asyncio.to_thread(self._call, self._placed(tenant), op)

    def _call(self, tenant: TenantRef, op: Callable[[hvac.Client], T]) -> T:
        """Run op with the tenant's client; on 403 re-provision once (OpenBao restarted or token
        revoked), then give up: a second refusal is OpenBao enforcing isolation."""
        for attempt in (1, 2):
            try:
                return op(self.tokens.client_for(tenant))
            except vx.Forbidden:
                if attempt == 2:
                    raise errors.PermissionDenied(
                        "the secret manager refused this tenant's token", reason="SECRET_MANAGER_DENIED"
                    ) from None
                self.tokens.forget(tenant)
            except _DOWN:
                raise _unavailable() from None
        raise AssertionError("unreachable")

    # -- SecretBackend --------------------------------------------------------------------------

    async def write(self, tenant: TenantRef, name: str, value: bytes, *, cas: int | None) -> int:
        """Write a KV v2 version (cas passed through to OpenBao's own check-and-set)."""
        path = self.layout.secret_path(tenant, name)

        def op(client: hvac.Client) -> int:
            try:
                out = client.secrets.kv.v2.create_or_update_secret(
                    path, secret={"value": base64.b64encode(value).decode()}, cas=cas, mount_point=self.layout.kv_mount
                )
            except vx.InvalidRequest as exc:
                if "check-and-set" in str(exc):
                    raise cas_mismatch(cas if cas is not None else -1) from None
                raise
            return int(out["data"]["version"])

        return await self._run(tenant, op)

    async def read(self, tenant: TenantRef, name: str, version: int | None = None) -> StoredValue:
        """Read a KV v2 version; deleted, destroyed or missing versions are NotFound."""
        path = self.layout.secret_path(tenant, name)

        def op(client: hvac.Client) -> StoredValue:
            try:
                out = client.secrets.kv.v2.read_secret_version(
                    path, version=version, mount_point=self.layout.kv_mount, raise_on_deleted_version=True
                )
            except vx.InvalidPath:
                raise errors.NotFound("that secret version does not exist", reason="SECRET_VERSION_NOT_FOUND") from None
            data = out["data"]
            return StoredValue(int(data["metadata"]["version"]), base64.b64decode(data["data"]["value"]))

        # The lean read on the loop (vault_read); anything but a plain 200 goes through hvac.
        fast = await self._reader.read(self._placed(tenant), path, version)
        return fast if fast is not None else await self._run(tenant, op)

    async def delete(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        """Soft-delete versions in KV v2."""
        if versions:
            path = self.layout.secret_path(tenant, name)
            await self._run(
                tenant,
                lambda c: c.secrets.kv.v2.delete_secret_versions(
                    path, versions=versions, mount_point=self.layout.kv_mount
                ),
            )

    async def destroy(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        """Destroy versions in KV v2 (their data is removed)."""
        if versions:
            path = self.layout.secret_path(tenant, name)
            await self._run(
                tenant,
                lambda c: c.secrets.kv.v2.destroy_secret_versions(
                    path, versions=versions, mount_point=self.layout.kv_mount
                ),
            )

    async def purge(self, tenant: TenantRef, name: str) -> None:
        """Delete the KV v2 metadata and every version."""
        path = self.layout.secret_path(tenant, name)
        await self._run(
            tenant, lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point=self.layout.kv_mount)
        )

    async def versions_after(self, tenant: TenantRef, name: str, version: int) -> dict[int, bool]:
        """From the KV v2 metadata: the versions after `version`, each with whether it is destroyed."""
        path = self.layout.secret_path(tenant, name)

        def op(client: hvac.Client) -> dict[int, bool]:
            try:
                meta = client.secrets.kv.v2.read_secret_metadata(path, mount_point=self.layout.kv_mount)
            except vx.InvalidPath:
                return {}
            return {int(n): bool(v.get("destroyed")) for n, v in meta["data"]["versions"].items() if int(n) > version}

        return await self._run(tenant, op)

    # -- KeyBackend -----------------------------------------------------------------------------

    def _transit(
        self, tenant: TenantRef, fn: Callable[..., Callable[..., dict]], **kw
    ) -> Callable[[hvac.Client], dict]:
        key = self.layout.key_name(tenant)

        def op(client: hvac.Client) -> dict:
            try:
                return fn(client.secrets.transit)(key, mount_point=self.layout.transit_mount, **kw)
            except vx.InvalidRequest:
                raise decryption_failed() from None

        return op

    async def encrypt(self, tenant: TenantRef, plaintext: bytes) -> tuple[bytes, int]:
        """Transit encrypt with the tenant's key."""
        out = await self._run(
            tenant, self._transit(tenant, lambda t: t.encrypt_data, plaintext=base64.b64encode(plaintext).decode())
        )
        ct = out["data"]["ciphertext"].encode()
        return ct, _key_version(ct)

    async def decrypt(self, tenant: TenantRef, ciphertext: bytes) -> bytes:
        """Transit decrypt with the tenant's key; anything else is DECRYPTION_FAILED."""
        try:
            text = ciphertext.decode("ascii")
        except UnicodeDecodeError:
            raise decryption_failed() from None
        out = await self._run(tenant, self._transit(tenant, lambda t: t.decrypt_data, ciphertext=text))
        return base64.b64decode(out["data"]["plaintext"])

    async def generate_data_key(self, tenant: TenantRef, bits: int) -> DataKey:
        """Transit datakey/plaintext: the key and its wrapped form."""
        out = await self._run(
            tenant, self._transit(tenant, lambda t: t.generate_data_key, key_type="plaintext", bits=bits)
        )
        wrapped = out["data"]["ciphertext"].encode()
        return DataKey(base64.b64decode(out["data"]["plaintext"]), wrapped, _key_version(wrapped))

    async def rotate_key(self, tenant: TenantRef) -> int:
        """Rotate the tenant's Transit key and return its latest version."""
        key = self.layout.key_name(tenant)

        def op(client: hvac.Client) -> int:
            client.secrets.transit.rotate_key(key, mount_point=self.layout.transit_mount)
            return int(
                client.secrets.transit.read_key(key, mount_point=self.layout.transit_mount)["data"]["latest_version"]
            )

        return await self._run(tenant, op)

    async def rewrap(self, tenant: TenantRef, ciphertext: bytes) -> tuple[bytes, int]:
        """Transit rewrap: re-encrypt under the latest key version inside OpenBao."""
        try:
            text = ciphertext.decode("ascii")
        except UnicodeDecodeError:
            raise decryption_failed() from None
        out = await self._run(tenant, self._transit(tenant, lambda t: t.rewrap_data, ciphertext=text))
        ct = out["data"]["ciphertext"].encode()
        return ct, _key_version(ct)
