"""The `vault` backend: KV v2 values and Transit keys in OpenBao/Vault, each call made with the
tenant's own short-lived token (see vault_tokens). hvac is synchronous, so calls run in threads.
"""
from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable
from typing import TypeVar

import hvac
import hvac.exceptions as vx
import requests

from services.credentials.backend import (
    DataKey,
    StoredValue,
    TenantRef,
    cas_mismatch,
    decryption_failed,
)
from services.credentials.vault_layout import VaultLayout
from services.credentials.vault_tokens import TenantTokens
from shared import errors

T = TypeVar("T")
_DOWN = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, vx.VaultDown,
         vx.InternalServerError, vx.BadGateway)
_KEY_VERSION = re.compile(rb"^vault:v(\d+):")


def _unavailable() -> errors.Unavailable:
    return errors.Unavailable("the secret manager (OpenBao) is unreachable or sealed; nothing was changed, retry later",
                              reason="SECRET_MANAGER_UNAVAILABLE", retry_after=1.0)


def _session_for(url: str) -> requests.Session:
    """A requests session for OpenBao with the environment's proxy and CA settings resolved once.

    requests otherwise re-reads the environment (proxies, CA bundle, netrc) on every call, about
    0.2 ms of CPU here.
    """
    session = requests.Session()
    settings = session.merge_environment_settings(url, {}, None, None, None)
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

    def __init__(self, url: str, admin_token: str, *, layout: VaultLayout | None = None,
                 token_ttl_seconds: int = 900, timeout: float = 5.0) -> None:
        self._session = _session_for(url)
        self.layout = layout or VaultLayout()
        self.tokens = TenantTokens(url, admin_token, layout=self.layout, ttl_seconds=token_ttl_seconds,
                                   timeout=timeout, session=self._session)

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        self._session.close()

    # -- plumbing -------------------------------------------------------------------------------

    async def _run(self, tenant: TenantRef, op: Callable[[hvac.Client], T]) -> T:
        return await asyncio.to_thread(self._call, tenant, op)

    def _call(self, tenant: TenantRef, op: Callable[[hvac.Client], T]) -> T:
        """Run op with the tenant's client; on 403 re-provision once (OpenBao restarted or token
        revoked), then give up: a second refusal is OpenBao enforcing isolation."""
        for attempt in (1, 2):
            try:
                return op(self.tokens.client_for(tenant))
            except vx.Forbidden:
                if attempt == 2:
                    raise errors.PermissionDenied("the secret manager refused this tenant's token",
                                                  reason="SECRET_MANAGER_DENIED") from None
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
                    path, secret={"value": base64.b64encode(value).decode()}, cas=cas,
                    mount_point=self.layout.kv_mount)
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
                    path, version=version, mount_point=self.layout.kv_mount, raise_on_deleted_version=True)
            except vx.InvalidPath:
                raise errors.NotFound("that secret version does not exist", reason="SECRET_VERSION_NOT_FOUND") from None
            data = out["data"]
            return StoredValue(int(data["metadata"]["version"]), base64.b64decode(data["data"]["value"]))

        return await self._run(tenant, op)

    async def delete(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        """Soft-delete versions in KV v2."""
        if versions:
            path = self.layout.secret_path(tenant, name)
            await self._run(tenant, lambda c: c.secrets.kv.v2.delete_secret_versions(
                path, versions=versions, mount_point=self.layout.kv_mount))

    async def destroy(self, tenant: TenantRef, name: str, versions: list[int]) -> None:
        """Destroy versions in KV v2 (their data is removed)."""
        if versions:
            path = self.layout.secret_path(tenant, name)
            await self._run(tenant, lambda c: c.secrets.kv.v2.destroy_secret_versions(
                path, versions=versions, mount_point=self.layout.kv_mount))

    async def purge(self, tenant: TenantRef, name: str) -> None:
        """Delete the KV v2 metadata and every version."""
        path = self.layout.secret_path(tenant, name)
        await self._run(tenant, lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(
            path, mount_point=self.layout.kv_mount))

    # -- KeyBackend -----------------------------------------------------------------------------

    def _transit(self, tenant: TenantRef, fn: Callable[..., dict], **kw) -> Callable[[hvac.Client], dict]:
        key = self.layout.key_name(tenant)

        def op(client: hvac.Client) -> dict:
            try:
                return fn(client.secrets.transit)(key, mount_point=self.layout.transit_mount, **kw)
            except vx.InvalidRequest:
                raise decryption_failed() from None
        return op

    async def encrypt(self, tenant: TenantRef, plaintext: bytes) -> tuple[bytes, int]:
        """Transit encrypt with the tenant's key."""
        out = await self._run(tenant, self._transit(tenant, lambda t: t.encrypt_data,
                                                    plaintext=base64.b64encode(plaintext).decode()))
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
        out = await self._run(tenant, self._transit(tenant, lambda t: t.generate_data_key,
                                                    key_type="plaintext", bits=bits))
        wrapped = out["data"]["ciphertext"].encode()
        return DataKey(base64.b64decode(out["data"]["plaintext"]), wrapped, _key_version(wrapped))

    async def rotate_key(self, tenant: TenantRef) -> int:
        """Rotate the tenant's Transit key and return its latest version."""
        key = self.layout.key_name(tenant)

        def op(client: hvac.Client) -> int:
            client.secrets.transit.rotate_key(key, mount_point=self.layout.transit_mount)
            return int(client.secrets.transit.read_key(key, mount_point=self.layout.transit_mount)["data"]["latest_version"])

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
