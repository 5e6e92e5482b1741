"""Just-in-time secret injection for tool calls (the orchestrator's side of credentials).

    injector = SecretInjector(make_channel(credentials_addr, forward=True))
    async with injector.inject({"STRIPE_KEY": "stripe-key", "DB_URL": SecretRef("db-url", version=3)}) as env:
        result = await run_tool(env=env.reveal())      # plain values, for this call only

Values are fetched with the caller's own forwarded token (so credentials enforces the tenant and
the read scope), registered with the log scrubber, and kept in a mapping whose repr shows no
value. If the tool raises, the exception that leaves the block is a ToolFailed whose message
has every value redacted; the original is suppressed and stripped of its message and frames
(tracebacks and span events would print them). Values never go into state, spans or the model context from here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

import grpc

from bulkhead.credentials.v1 import credentials_pb2, credentials_pb2_grpc
from shared import errors
from shared.errors import peer_call
from shared.logs import REDACTED, register_secret


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A reference to one secret of the current tenant."""

    name: str
    """The secret's name in credentials."""
    version: int = 0
    """A pinned version; 0 means the current one."""


class SecretResolutionError(Exception):
    """A referenced secret could not be fetched; the message names the reference, never a value."""

    def __init__(self, env_name: str, ref: SecretRef, code: grpc.StatusCode, reason: str | None):
        super().__init__(
            f"secret {ref.name!r} (for {env_name}) could not be resolved: {code.name}"
            + (f" ({reason})" if reason else "")
        )
        self.env_name, self.ref, self.code, self.reason = env_name, ref, code, reason


class ToolFailed(Exception):
    """The tool raised; its message has every injected value redacted."""

    def __init__(self, message: str, original_type: str):
        super().__init__(message)
        self.original_type = original_type
        """The class name of what the tool raised (the original object is dropped on purpose)."""


class InjectedSecrets(Mapping[str, str]):
    """Resolved values by the name the tool expects; repr and str never show a value."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def reveal(self) -> dict[str, str]:
        """A plain dict of the values, to hand to the tool."""
        return dict(self._values)

    def redact(self, text: str) -> str:
        """text with every injected value replaced by [REDACTED]."""
        for value in sorted(self._values.values(), key=len, reverse=True):
            if value:
                text = text.replace(value, REDACTED)
        return text

    def clear(self) -> None:
        """Drop the values (the end of the tool call)."""
        self._values.clear()

    def __repr__(self) -> str:
        return f"InjectedSecrets({', '.join(f'{k}={REDACTED}' for k in self._values)})"

    __str__ = __repr__


class SecretInjector:
    """Resolves secret references for one tool call at a time. No retry loop: the channel resends GetSecret
    (idempotent) on UNAVAILABLE, and credentials rides out its own audit-chain races."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 5.0) -> None:
        self._stub = credentials_pb2_grpc.CredentialsServiceStub(channel)
        self._timeout = timeout

    async def resolve(self, refs: Mapping[str, SecretRef | str]) -> InjectedSecrets:
        """Fetch every reference (in parallel) as the current tenant; all or nothing."""
        normalized = {env: ref if isinstance(ref, SecretRef) else SecretRef(ref) for env, ref in refs.items()}
        values = await asyncio.gather(*(self._fetch(env, ref) for env, ref in normalized.items()))
        return InjectedSecrets(dict(zip(normalized, values, strict=True)))

    async def _fetch(self, env_name: str, ref: SecretRef) -> str:
        try:
            with peer_call():
                reply = await self._stub.GetSecret(
                    credentials_pb2.GetSecretRequest(name=ref.name, version=ref.version), timeout=self._timeout
                )
        except errors.Unavailable:
            raise  # transient, not the reference's fault: the run is given back and does this step again
        except errors.BulkheadError as err:
            raise SecretResolutionError(env_name, ref, err.code, err.reason) from None
        value = reply.value.decode()
        register_secret(value)
        return value

    @contextlib.asynccontextmanager
    async def inject(self, refs: Mapping[str, SecretRef | str]) -> AsyncIterator[InjectedSecrets]:
        """Resolve refs, yield them for one tool call, then drop them; a failing tool's error is redacted."""
        secrets = await self.resolve(refs)
        try:
            yield secrets
        except Exception as exc:  # noqa: BLE001 - replaced by a redacted error
            failure = ToolFailed(secrets.redact(f"{type(exc).__name__}: {exc}"), type(exc).__name__)
            # Python keeps the original as __context__; strip what could hold a value (its message,
            # and frames whose locals may), and suppress it so tracebacks and span events skip it.
            exc.args, exc.__traceback__ = (), None
            raise failure from None
        finally:
            secrets.clear()
