"""One model call from policy to metering: the inference proxy's pipeline.

    policy (model allowed? pinned version, max_tokens ceiling)
      -> rate limits (requests/min, tokens/min, in flight)  -> budget hold (lease)
      -> provider key (tenant's own, else the platform's)   -> upstream (retries only when safe)
      -> settle budget and limits with the real usage        -> usage event (request id = idempotency key)

Everything before the upstream call can refuse it, so a refused call never reaches the
upstream. The upstream part runs in a task of its own: when the caller goes away mid-call
the task still finishes, settles and meters what the upstream reported. No grpc imports.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from opentelemetry import trace

from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference import wire
from services.inference.attempts import (
    Attempt,
    AttemptJournal,
    JournalUnavailable,
    context_json,
    event_id,
)
from services.inference.budget import (
    BackendUnavailable,
    BudgetLeases,
    BudgetRefused,
    Hold,
    Tokens,
)
from services.inference.limits import Admission, Limits, RateLimiter, Rejected
from services.inference.policy import (
    Policy,
    PolicyViolation,
    PrivateModel,
    ResolvedModel,
    cap_max_tokens,
    resolve,
)
from services.inference.providers import (
    ATTEMPT_REF,
    OFFLINE,
    Provider,
    Target,
    UpstreamError,
)
from services.inference.usage import UsageEvent, UsageMeter
from shared import errors
from shared.cache import TenantCache
from shared.tenancy import TenantContext, require_tenant

log = logging.getLogger("bulkhead.inference.calls")


class PolicySource(Protocol):
    """The current tenant's stored policy and private models."""

    async def policy(self) -> Policy: ...

    async def private_models(self) -> dict[str, PrivateModel]: ...


class QuotaSource(Protocol):
    """The current tenant's rate limits (metering's Quota)."""

    async def limits(self) -> Limits: ...


class KeySource(Protocol):
    """The tenant's own provider key, if it has one."""

    async def tenant_key(self, ctx: TenantContext) -> str | None: ...


@dataclass(frozen=True)
class CallInfo:
    """How the proxy served a call (returned to the caller and logged)."""

    request_id: str
    requested_model: str
    resolved_model: str
    provider: str
    tenant_key: bool

    def to_proto(self) -> pb.CallInfo:
        """As the proto message."""
        return pb.CallInfo(
            request_id=self.request_id,
            requested_model=self.requested_model,
            resolved_model=self.resolved_model,
            provider=self.provider,
            tenant_key=self.tenant_key,
        )


@dataclass
class _Call:
    ctx: TenantContext
    body: dict[str, Any]
    target: Target
    info: CallInfo
    admission: Admission
    hold: Hold
    started: float
    occurred_at: float
    trace_id: str
    reserve: Tokens
    """The call's reservation by kind (input estimate, max_tokens): what an attempt of unknown usage is charged."""


class InferenceProxy:
    """Runs model calls for the tenant of the current context."""

    def __init__(
        self,
        *,
        provider: Provider,
        platform_key: str,
        policies: PolicySource,
        platform_policy: Policy,
        limiter: RateLimiter,
        quotas: QuotaSource,
        budget: BudgetLeases,
        meter: UsageMeter,
        keys: KeySource,
        max_attempts: int = 3,
        max_retry_wait: float = 5.0,
        user_id_salt: str,
        cache_ttl: float = 5.0,
        journal: AttemptJournal | None = None,
    ):
        self._provider = provider
        self._platform_key = platform_key
        self._policies = policies
        self._platform_policy = platform_policy
        self._limiter = limiter
        self._quotas = quotas
        self._budget = budget
        self._meter = meter
        self._keys = keys
        self._max_attempts = max(1, max_attempts)
        self._max_retry_wait = max_retry_wait
        self._salt = user_id_salt.encode()
        # unreachable sources: the last good value, else defaults; refusals propagate
        self._policy_cache: TenantCache[tuple[Policy, dict[str, PrivateModel]]] = TenantCache(
            cache_ttl, stale_on=(BackendUnavailable,)
        )
        self._limits_cache: TenantCache[Limits] = TenantCache(cache_ttl, stale_on=(BackendUnavailable,))
        self._tasks: set[asyncio.Task] = set()
        self._replays = _ReplayCache()
        self._journal = journal
        # tenant -> (opaque user id, cache partition): two keyed hashes of the tenant id alone, made once
        self._upstream_ids: dict[str, tuple[str, str]] = {}

    # ----- policy -----
    async def effective_policy(self) -> tuple[Policy, dict[str, PrivateModel]]:
        """The current tenant's policy with platform defaults filled in, and its private models."""
        ctx = require_tenant()

        async def load() -> tuple[Policy, dict[str, PrivateModel]]:
            return (await self._policies.policy()).with_defaults(
                self._platform_policy
            ), await self._policies.private_models()

        return await self._policy_cache.load(ctx.tenant_id, load)

    def forget_policy(self, tenant_id: str) -> None:
        """Drop a tenant's cached policy (after it changed on this replica)."""
        self._policy_cache.invalidate(tenant_id)

    async def resolve(self, params: pb.MessageParams, *, with_max_tokens: bool = True) -> tuple[ResolvedModel, dict]:
        """The model a request may use and its upstream body, or InvalidArgument / PermissionDenied."""
        policy, private = await self.effective_policy()
        try:
            model = resolve(params.model, policy, private)
            max_tokens = cap_max_tokens(params.max_tokens, policy) if with_max_tokens else None
        except PolicyViolation as v:
            if v.reason == "MODEL_NOT_ALLOWED":
                raise errors.PermissionDenied(str(v), reason=v.reason) from None
            raise errors.InvalidArgument(str(v), reason=v.reason, violations={v.field: str(v)}) from None
        if not params.messages:
            raise errors.InvalidArgument(
                "at least one message is required",
                reason="MESSAGES_REQUIRED",
                violations={"params.messages": "at least one message is required"},
            )
        try:
            body = wire.params_to_json(params, model=model.upstream_model, max_tokens=max_tokens)
        except wire.WireError as exc:
            raise errors.InvalidArgument(
                str(exc), reason="INVALID_MESSAGE", violations={exc.field: exc.problem}
            ) from None
        return model, body

    # ----- calls -----
    async def create(self, params: pb.MessageParams) -> tuple[dict[str, Any], CallInfo]:
        """One unary call; the upstream's reply (JSON-shaped) and how it was served.

        A retry with the same request id (x-request-id) gets the first call's reply instead of a
        second upstream call, so usage stays one event per upstream call (on this replica).
        """
        ctx = require_tenant()
        key = (ctx.tenant_id, ctx.request_id)
        fingerprint = hashlib.sha256(params.SerializeToString(deterministic=True)).digest()
        earlier = self._replays.get(key)
        if earlier is not None:
            if earlier[0] != fingerprint:
                raise errors.InvalidArgument(
                    "this request id was already used for a different request",
                    reason="REQUEST_ID_REUSED",
                    violations={"x-request-id": "send a new request id for a new request"},
                )
            if isinstance(earlier[1], tuple):  # finished: its reply is kept (as JSON text), not its task
                return orjson.loads(earlier[1][0]), earlier[1][1]
            return await asyncio.shield(earlier[1])
        call = await self._prepare(params)
        # One task per call: it answers this caller and any retry of the same request id.
        reply = asyncio.create_task(self._complete_with_info(call))
        self._tasks.add(reply)
        self._replays.put(key, (fingerprint, reply))
        # One callback does what _keep's two and the reply cache's would (a callback less per call is ~1 us).
        reply.add_done_callback(lambda f: self._replied(key, fingerprint, f))
        # shield: a caller that goes away does not cancel the upstream call; it finishes and is metered.
        return await asyncio.shield(reply)

    def _replied(self, key: tuple[str, str], fingerprint: bytes, reply: asyncio.Task) -> None:
        """A unary call ended: keep just its reply for retries, as compact JSON text (a task and its context
        weigh several KB more, the reply's dicts about 2 KB, its text a fifth of that; times the 10,000
        kept), or forget a failed one so its retry reaches the upstream again. Its error is read here, so
        asyncio does not complain of one a caller that left never read."""
        self._tasks.discard(reply)
        if reply.cancelled():
            return
        if reply.exception() is not None:
            self._replays.drop(key)
        else:
            message, info = reply.result()
            self._replays.replace(key, (fingerprint, (orjson.dumps(message).decode(), info)))

    async def open_stream(self, params: pb.MessageParams) -> tuple[CallInfo, AsyncIterator[dict[str, Any]]]:
        """Start a streamed call; refusals raise here, before any upstream request."""
        call = await self._prepare(params)
        queue: asyncio.Queue = asyncio.Queue()
        self._keep(asyncio.create_task(self._pump(call, queue)))
        return call.info, _drain_queue(queue)

    async def count_tokens(self, params: pb.MessageParams) -> tuple[int, str]:
        """Input tokens of a request (by the upstream's count) and the model it was counted for."""
        ctx = require_tenant()
        model, body = await self.resolve(params, with_max_tokens=False)
        target = await self._target(ctx, model)
        try:
            return await self._provider.count_tokens(body, target), model.upstream_model
        except UpstreamError as exc:
            raise _status(exc) from None

    async def close(self) -> None:
        """Wait for calls still finishing in the background (their usage must be metered)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- pipeline -----
    async def _prepare(self, params: pb.MessageParams) -> _Call:
        ctx = require_tenant()
        started = time.perf_counter()
        model, body = await self.resolve(params)
        reserve = Tokens(input=wire.estimate_input_tokens(body), output=body["max_tokens"])
        estimate = reserve.total
        limits = await self._limits_cache.load(ctx.tenant_id, self._quotas.limits, fallback=Limits())
        try:
            admission = self._limiter.admit(ctx.tenant_id, limits, estimate)
        except Rejected as r:
            raise errors.ResourceExhausted(
                str(r), violations=r.violations, retry_after=r.retry_after, reason="RATE_LIMITED"
            ) from None
        try:
            target = await self._target(ctx, model)
            hold = await self._hold_budget(ctx, model.upstream_model, estimate)
        except BaseException:
            admission.settle(0)
            raise
        body["metadata"] = {"user_id": self.opaque_user_id(ctx.tenant_id)}
        span = trace.get_current_span()
        trace_id = format(span.get_span_context().trace_id, "032x") if span.get_span_context().is_valid else ""
        info = CallInfo(
            ctx.request_id,
            model.requested,
            model.upstream_model,
            self._provider.name,
            target.api_key != self._platform_key,
        )
        if not info.tenant_key and self._provider.name != OFFLINE:
            # The platform key's prompt cache is shared by every tenant: a hit (its latency, its
            # cache_read count) would tell one tenant another's prompt. Each tenant's cached prefixes
            # pass through its own marker, so they never match another's. Not counted in the
            # reservation above; the upstream's usage (which includes its few tokens) is what is metered.
            body = wire.partition_prompt_cache(body, self.cache_partition(ctx.tenant_id))
        _tag_span(span, ctx, info)
        return _Call(ctx, body, target, info, admission, hold, started, time.time(), trace_id, reserve)

    def opaque_user_id(self, tenant_id: str) -> str:
        """The stable id the upstream sees for a tenant: a keyed hash, never the tenant's id or name."""
        return self._ids_of(tenant_id)[0]

    def cache_partition(self, tenant_id: str) -> str:
        """The text that starts a tenant's cached prompt prefixes on the platform key: a keyed hash of
        the tenant id (under the same platform secret as opaque_user_id, in a domain of its own), so
        it names no tenant and two tenants' never collide. A tenant that copied another's into its own
        prompt gains nothing: its own marker still comes first."""
        return self._ids_of(tenant_id)[1]

    def _ids_of(self, tenant_id: str) -> tuple[str, str]:
        """A tenant's opaque user id and cache partition, hashed on its first call and kept (two HMACs per
        call were ~10 us of CPU); bounded by forgetting them all past 10,000 tenants."""
        ids = self._upstream_ids.get(tenant_id)
        if ids is None:
            user = hmac.new(self._salt, tenant_id.encode(), hashlib.sha256).hexdigest()[:32]
            partition = hmac.new(self._salt, b"prompt-cache-partition\0" + tenant_id.encode(), hashlib.sha256)
            ids = ("bh_" + user, "cache-partition:" + partition.hexdigest()[:32])
            if len(self._upstream_ids) >= 10_000:
                self._upstream_ids.clear()
            self._upstream_ids[tenant_id] = ids
        return ids

    async def _target(self, ctx: TenantContext, model: ResolvedModel) -> Target:
        try:
            own = await self._keys.tenant_key(ctx)
        except BackendUnavailable as exc:
            log.warning("provider key lookup failed: %s", exc)
            raise errors.Unavailable(
                "credentials unreachable: cannot tell which provider key to use",
                reason="CREDENTIALS_UNAVAILABLE",
                retry_after=1.0,
            ) from None
        if model.private and model.base_url and not own:
            # A tenant's own endpoint is only ever called with the tenant's own key.
            raise errors.FailedPrecondition(
                "this private model's endpoint needs the tenant's own provider key", reason="TENANT_KEY_REQUIRED"
            )
        return Target(api_key=own or self._platform_key, base_url=model.base_url)

    async def _hold_budget(self, ctx: TenantContext, model: str, amount: int) -> Hold:
        try:
            return await self._budget.hold(ctx, model, amount)
        except BudgetRefused as r:
            raise errors.ResourceExhausted(
                f"budget exhausted: {r}", violations=r.violations, retry_after=r.retry_after, reason="BUDGET_EXHAUSTED"
            ) from None
        except BackendUnavailable:
            raise errors.Unavailable(
                "metering unreachable and no budget lease held", retry_after=1.0, reason="METERING_UNAVAILABLE"
            ) from None

    async def _complete_with_info(self, call: _Call) -> tuple[dict[str, Any], CallInfo]:
        return await self._complete(call), call.info

    async def _complete(self, call: _Call) -> dict[str, Any]:
        message: dict[str, Any] | None = None
        spent = Tokens()
        try:
            for n in range(1, self._max_attempts + 1):
                attempt = await self._open_attempt(call, n)
                try:
                    message = await self._provider.create(call.body, call.target)
                except UpstreamError as exc:
                    spent.add(self._meter_attempt(call, attempt, None, None, "error", unknown=_maybe_billed(exc)))
                    wait = self._retry_wait(exc, n)
                    if wait is None:
                        raise _status(exc) from None
                    log.info("upstream %s (%s); retry %d in %.3fs", exc.kind, exc.status, n, wait)
                    await asyncio.sleep(wait)
                    continue
                except BaseException:
                    spent.add(self._meter_attempt(call, attempt, None, None, "cancelled", unknown=True))
                    raise
                spent.add(self._meter_attempt(call, attempt, message.get("usage"), message.get("model"), "success"))
                return message
            raise AssertionError("unreachable")
        finally:
            self._finish(call, spent, (message or {}).get("model"), "success" if message else "error")

    async def _open_attempt(self, call: _Call, n: int) -> Attempt | int:
        """Record the attempt before it goes upstream (write-ahead); its number when there is no journal."""
        if self._journal is None:
            ATTEMPT_REF.set(self._attempt_ref(call.ctx.tenant_id, event_id(call.ctx.request_id, n)))
            return n
        try:
            attempt = await self._journal.open(
                call.ctx,
                model=call.info.resolved_model,
                reserve=call.reserve,
                context=context_json(call.ctx, trace_id=call.trace_id, occurred_at=call.occurred_at),
            )
        except JournalUnavailable as exc:
            log.warning("%s", exc)
            raise errors.Unavailable(
                "the proxy could not record the call before sending it; nothing was sent",
                reason="ATTEMPT_JOURNAL_UNAVAILABLE",
                retry_after=1.0,
            ) from None
        ATTEMPT_REF.set(self._attempt_ref(call.ctx.tenant_id, attempt.event_id))
        return attempt

    def _attempt_ref(self, tenant_id: str, event: str) -> str:
        """The opaque id an attempt is sent upstream with (x-bulkhead-attempt): no tenant or request id in clear."""
        return attempt_ref(self._salt, tenant_id, event)

    def _meter_attempt(
        self,
        call: _Call,
        attempt: Attempt | int,
        usage: dict[str, Any] | None,
        served_model: str | None,
        outcome: str,
        *,
        unknown: bool = False,
    ) -> Tokens:
        """Meter one upstream attempt: its reported usage, else (when it may have been billed) its reservation."""
        at_reservation = not usage and unknown
        tokens = _tokens(usage) if usage else (Tokens(call.reserve.input, call.reserve.output) if unknown else Tokens())
        ctx = call.ctx
        number = attempt if isinstance(attempt, int) else attempt.number
        event = UsageEvent(
            tenant_id=ctx.tenant_id,
            idempotency_key=event_id(ctx.request_id, number),
            principal_id=ctx.principal_id,
            agent_id=ctx.agent_id or "",
            run_id=ctx.run_id or "",
            model=served_model or call.info.resolved_model,
            tokens=tokens,
            latency_ms=int((time.perf_counter() - call.started) * 1000),
            outcome=outcome,
            occurred_at=call.occurred_at,
            trace_id=call.trace_id,
            tier=ctx.tier or "pooled",
            attempt=number,
            at_reservation=at_reservation,
        )
        journal = self._journal
        if not isinstance(attempt, int):
            assert journal is not None, "an Attempt comes from the journal"
            journal.settle(attempt, event)
        if tokens.total:
            self._meter.record(ctx, event)
        elif journal is not None and not isinstance(attempt, int):
            journal.delivered([event])  # nothing to bill: the row is done
        return tokens

    def _retry_wait(self, exc: UpstreamError, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when the failure must go to the caller."""
        if not exc.retry_safe or attempt >= self._max_attempts:
            return None
        if exc.retry_after is not None:
            return exc.retry_after if exc.retry_after <= self._max_retry_wait else None
        return min(self._max_retry_wait, 0.05 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)

    async def _pump(self, call: _Call, queue: asyncio.Queue) -> None:
        """Read the upstream stream into queue to its end (even with no reader left), then meter."""
        usage: dict[str, Any] = {}
        model: str | None = None
        outcome = "error"
        spent = Tokens()
        attempt: Attempt | int | None = None
        try:
            for n in range(1, self._max_attempts + 1):
                started = False
                usage = {}
                current = attempt = await self._open_attempt(call, n)
                try:
                    async for event in self._provider.stream(call.body, call.target):
                        started = True
                        kind = event.get("type")
                        if kind == "message_start":
                            model = event["message"].get("model")
                            usage = dict(event["message"].get("usage") or {})
                        elif kind == "message_delta":
                            usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
                        queue.put_nowait(event)
                    outcome = "success"
                    spent.add(self._meter_attempt(call, current, usage or None, model, outcome))
                    attempt = None
                    break
                except UpstreamError as exc:
                    # Cut mid-stream: settled from what the upstream reported before the cut.
                    spent.add(
                        self._meter_attempt(
                            call, current, usage or None, model, "error", unknown=started or _maybe_billed(exc)
                        )
                    )
                    attempt = None
                    wait = None if started else self._retry_wait(exc, n)
                    if wait is None:
                        queue.put_nowait(_status(exc))
                        break
                    await asyncio.sleep(wait)
        except errors.BulkheadError as exc:
            queue.put_nowait(exc)
        except Exception as exc:  # never leave the reader hanging
            log.exception("stream pump failed")
            queue.put_nowait(errors.BulkheadError(f"stream failed: {type(exc).__name__}"))
        finally:
            if attempt is not None:  # cancelled or broken mid-attempt: what was reported, else the reservation
                spent.add(self._meter_attempt(call, attempt, usage or None, model, "cancelled", unknown=True))
            queue.put_nowait(_END)
            self._finish(call, spent, model, outcome)

    def _finish(self, call: _Call, tokens: Tokens, served_model: str | None, outcome: str) -> None:
        """Settle limits and budget with what the call's attempts were metered at."""
        self._budget.settle(call.hold, tokens)
        call.admission.settle(tokens.total)
        if not log.isEnabledFor(logging.INFO):
            return
        latency_ms = int((time.perf_counter() - call.started) * 1000)
        ctx = call.ctx
        log.info(
            "model call",
            extra={
                "principal_id": ctx.principal_id,
                "agent_id": ctx.agent_id or "",
                "run_id": ctx.run_id or "",
                "model": call.info.resolved_model,
                "served_model": served_model or "",
                "outcome": outcome,
                "input_tokens": tokens.input,
                "output_tokens": tokens.output,
                "latency_ms": latency_ms,
                "tenant_key": call.info.tenant_key,
            },
        )

    def _keep(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A caller that left never reads the task's error; read it here so asyncio does not complain.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


_END = object()


class _ReplayCache:
    """Recent unary calls by (tenant, request id): their request fingerprint and reply (bounded, expiring)."""

    def __init__(self, *, size: int = 10_000, ttl: float = 600.0):
        self._size = size
        self._ttl = ttl
        self._entries: collections.OrderedDict[tuple[str, str], tuple[float, Any]] = collections.OrderedDict()

    def get(self, key: tuple[str, str]) -> Any:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: tuple[str, str], value: Any) -> None:
        self._entries[key] = (time.monotonic() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def replace(self, key: tuple[str, str], value: Any) -> None:
        """Swap the value of a key still kept (same expiry and place); nothing when it is gone."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], value)

    def drop(self, key: tuple[str, str]) -> None:
        """Forget a failed call: a retry of it must reach the upstream again."""
        self._entries.pop(key, None)


async def _drain_queue(queue: asyncio.Queue) -> AsyncIterator[dict[str, Any]]:
    while True:
        item = await queue.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def attempt_ref(salt: bytes, tenant_id: str, event: str) -> str:
    """The opaque id of one upstream attempt (a keyed hash of tenant and event id)."""
    return "att_" + hmac.new(salt, f"{tenant_id}\0{event}".encode(), hashlib.sha256).hexdigest()[:32]


def _maybe_billed(exc: UpstreamError) -> bool:
    """Whether a failed attempt may still have been billed: no answer came back (timeout, a cut connection)."""
    return not exc.retry_safe and not exc.status


def _tokens(usage: dict[str, Any]) -> Tokens:
    return Tokens(
        input=usage.get("input_tokens") or 0,
        output=usage.get("output_tokens") or 0,
        cache_write=usage.get("cache_creation_input_tokens") or 0,
        cache_read=usage.get("cache_read_input_tokens") or 0,
    )


def _tag_span(span: trace.Span, ctx: TenantContext, info: CallInfo) -> None:
    if not span.is_recording():
        return
    span.set_attribute("tenant.id", ctx.tenant_id)
    span.set_attribute("enduser.id", ctx.principal_id)
    span.set_attribute("bulkhead.request_id", ctx.request_id)
    if ctx.agent_id:
        span.set_attribute("bulkhead.agent_id", ctx.agent_id)
    if ctx.run_id:
        span.set_attribute("bulkhead.run_id", ctx.run_id)
    span.set_attribute("gen_ai.request.model", info.resolved_model)
    span.set_attribute("bulkhead.provider", info.provider)


def _status(exc: UpstreamError) -> errors.BulkheadError:
    """The status an upstream failure becomes."""
    if exc.kind == "rate_limited":
        return errors.ResourceExhausted(
            exc.message,
            violations=[("upstream", "the model provider's rate limit")],
            retry_after=exc.retry_after if exc.retry_after is not None else 1.0,
            reason="UPSTREAM_RATE_LIMITED",
        )
    if exc.kind == "invalid":
        return errors.InvalidArgument(exc.message, reason="UPSTREAM_INVALID_REQUEST")
    if exc.kind == "key_rejected":
        return errors.FailedPrecondition(exc.message, reason="PROVIDER_KEY_REJECTED")
    return errors.Unavailable(exc.message, retry_after=exc.retry_after, reason="UPSTREAM_UNAVAILABLE")
