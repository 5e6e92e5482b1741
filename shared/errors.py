"""Domain errors that handlers raise, and their translation into precise gRPC statuses.

Handlers never set status codes by hand: they raise one of these, and the server's error
interceptor turns it into a status carrying google.rpc details (always an ErrorInfo with a
machine-readable reason, plus BadRequest / QuotaFailure / RetryInfo where they apply).

Every reason comes from one catalog, the `bulkhead.common.v1.ErrorReason` enum
(protos/bulkhead/common/v1/errors.proto), which every client language sees: `Reason.TENANT_NOT_FOUND`
here, and ErrorInfo.reason carries the value's name. An error built with any other reason raises
ValueError at once, so a typo fails the first test that reaches it.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from bulkhead.common.v1 import errors_pb2

ERROR_DOMAIN = "bulkhead.dev"
_DETAILS_KEY = "grpc-status-details-bin"
MAX_DETAILS_BYTES = 1024
"""The most an error's serialized google.rpc.Status may take: errors echo input, and metadata is capped at 8 KB."""
MAX_VIOLATIONS = 20
"""The most field or quota violations one error lists (the first ones; the message says what is wrong)."""
MAX_ECHO_BYTES = 200
"""The most of any one string (message, metadata value, field, description) an error carries, in UTF-8
bytes: counting characters let a 4-byte-per-character echo quadruple an error's size."""
_MARK = "\u2026"  # 3 bytes in UTF-8

if TYPE_CHECKING:  # members come from the proto at run time; tests/test_error_reasons.py checks every use by name
    Reason: Any
else:
    Reason = enum.StrEnum(
        "Reason",
        [
            (v.name, v.name)
            for v in errors_pb2.ErrorReason.DESCRIPTOR.values
            if v.number and not v.GetOptions().deprecated
        ],
    )
"""The reason catalog as str members (`Reason.INVALID_TENANT_ID == "INVALID_TENANT_ID"`), from the proto enum
(deprecated values, kept there for compatibility, are no longer sent and are not members)."""
REASONS: frozenset[str] = frozenset(Reason)
"""Every reason a service may send."""


def catalog_reason(reason: str | None) -> str | None:
    """reason if the catalog has it, else None (for reasons read off the wire, e.g. a peer's)."""
    return reason if reason in REASONS else None


def _checked(reason: str) -> str:
    if reason not in REASONS:
        raise ValueError(
            f"unknown error reason {reason!r}: add it to ErrorReason in "
            "protos/bulkhead/common/v1/errors.proto (or use a name that is there)"
        )
    return str(reason)


def clip(text: str, limit: int = MAX_ECHO_BYTES) -> str:
    """text cut to at most `limit` UTF-8 bytes, marked when cut (echoed input never grows an error without bound)."""
    if len(text) * 4 <= limit:  # cannot be over, whatever the characters
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: limit - len(_MARK.encode())].decode("utf-8", "ignore") + _MARK


class BulkheadError(Exception):
    """Root of every error a Bulkhead service reports to its caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"
    peer: RpcFailure | None = None
    """The peer's failure this error was translated from (from_peer), else None."""

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        message = clip(message, 2 * MAX_ECHO_BYTES)
        super().__init__(message)
        self.message = message
        self.reason = _checked(reason or self.default_reason)
        self.metadata = {clip(k, 64): clip(str(v)) for k, v in (metadata or {}).items()}

    def details(self) -> list:
        """The google.rpc detail messages for this error (ErrorInfo first)."""
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)]

    def to_status(self) -> status_pb2.Status:
        """This error as a google.rpc.Status with packed details, never more than MAX_DETAILS_BYTES.

        A detail that does not fit is left out (ErrorInfo, first, always stays; a small RetryInfo
        after a large BadRequest still goes), so any request gets a precise, small answer.
        """
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details():
            status.details.add().Pack(detail)
            if status.ByteSize() > MAX_DETAILS_BYTES and len(status.details) > 1:
                del status.details[-1]
        if status.ByteSize() > MAX_DETAILS_BYTES:  # only ErrorInfo left: shed its metadata
            info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
            del status.details[:]
            status.details.add().Pack(info)
        return status


class InvalidArgument(BulkheadError):
    """The request is malformed; `violations` maps field paths to what is wrong with them."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, violations: Mapping[str, str] | None = None, **kw):
        super().__init__(message, **kw)
        self.violations = {clip(f): clip(d) for f, d in list((violations or {}).items())[:MAX_VIOLATIONS]}

    def details(self) -> list:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.violations.items()
            ]
        )
        return [*super().details(), bad] if self.violations else super().details()


class NotFound(BulkheadError):
    """The resource does not exist for this tenant (also said for other tenants' resources)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(BulkheadError):
    """A resource with that name already exists for this tenant."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class Unauthenticated(BulkheadError):
    """No valid credentials: missing, malformed, expired or revoked."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(BulkheadError):
    """Valid credentials that do not allow this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class FailedPrecondition(BulkheadError):
    """The system is not in a state this request needs (e.g. a check-and-set version mismatch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(BulkheadError):
    """A concurrency conflict: read again and retry (optimistic concurrency), after retry_after if given."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after

    def details(self) -> list:
        return [*super().details(), *_retry_info(self.retry_after)]


class Unavailable(BulkheadError):
    """A dependency is down; the call may succeed if retried later."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after

    def details(self) -> list:
        return [*super().details(), *_retry_info(self.retry_after)]


class DeadlineExceeded(BulkheadError):
    """The work did not finish in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class ResourceExhausted(BulkheadError):
    """A quota or budget is used up; `violations` are (subject, description) pairs."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "QUOTA_EXCEEDED"

    def __init__(
        self, message: str, *, violations: Iterable[tuple[str, str]] = (), retry_after: float | None = None, **kw
    ):
        super().__init__(message, **kw)
        self.violations = [(clip(s), clip(d)) for s, d in list(violations)[:MAX_VIOLATIONS]]
        self.retry_after = retry_after

    def details(self) -> list:
        quota = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=s, description=d) for s, d in self.violations]
        )
        return [*super().details(), quota, *_retry_info(self.retry_after)]


def _retry_info(seconds: float | None) -> list:
    if seconds is None:
        return []
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return [error_details_pb2.RetryInfo(retry_delay=delay)]


def trailing_metadata(error: BulkheadError) -> tuple[tuple[str, str | bytes], ...]:
    """The trailer that carries the rich status (what grpc_status.rpc_status.to_status builds).

    An UNAVAILABLE with a retry delay also carries it as gRPC's retry pushback, so a channel that
    resends idempotent calls (shared.service_config) waits as long as the server asked instead of
    hammering a dependency that is down (gRFC A6).
    """
    trailer: tuple[tuple[str, str | bytes], ...] = ((_DETAILS_KEY, error.to_status().SerializeToString()),)
    retry_after = getattr(error, "retry_after", None)
    if error.code == grpc.StatusCode.UNAVAILABLE and retry_after:
        trailer += (("grpc-retry-pushback-ms", str(int(retry_after * 1000))),)
    return trailer


@dataclass(frozen=True, slots=True)
class RpcFailure:
    """A peer's failed call, typed: its status and every google.rpc detail it carried (to_status's inverse)."""

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    """ErrorInfo.reason as sent: check it with catalog_reason before repeating it."""
    domain: str | None = None
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    field_violations: tuple[tuple[str, str], ...] = ()
    """BadRequest's (field, description) pairs."""
    quota_violations: tuple[tuple[str, str], ...] = ()
    """QuotaFailure's (subject, description) pairs."""
    retry_after: float | None = None
    """RetryInfo's delay in seconds."""

    @classmethod
    def of(cls, rpc_error: grpc.RpcError) -> RpcFailure:
        """Decode a failed call (grpc.aio.AioRpcError, or the sync API's grpc.RpcError) from its trailers."""
        # types-grpcio says _Metadatum objects; at run time they are (key, value) pairs (grpc.aio.Metadata's
        # items, or the sync API's namedtuples).
        trailers: Iterable[tuple[str, str | bytes]] = rpc_error.trailing_metadata() or ()  # type: ignore[assignment]
        raw = next((v for k, v in trailers if k == _DETAILS_KEY), None)
        code: grpc.StatusCode = rpc_error.code()
        fields: dict[str, Any] = {}
        for any_msg in status_pb2.Status.FromString(raw).details if isinstance(raw, bytes) else ():
            for kind in _DETAIL_KINDS:
                if any_msg.Is(kind.DESCRIPTOR):
                    msg = kind()
                    any_msg.Unpack(msg)
                    fields.update(_decoded(msg))
        return cls(code, rpc_error.details() or code.name, **fields)

    def to_error(self) -> BulkheadError:
        """The one translation of a peer's failure into our own error, to raise to our caller.

        The peer's message is kept (its own sanitised text). Its reason is kept when it is one of ours
        (our domain and in the catalog: an older or foreign peer's is not ours to repeat), else the code's
        name when that is a catalog reason, else the class default; the metadata only with the reason.
        Violations and the retry delay go on, so our reply carries the same BadRequest, QuotaFailure and
        RetryInfo. A peer's DEADLINE_EXCEEDED, or a code with no class of ours (INTERNAL, UNKNOWN, CANCELLED...),
        is our dependency failing: UNAVAILABLE (with reason DEADLINE_EXCEEDED, INTERNAL...), which callers treat
        as transient.
        """
        ours = catalog_reason(self.reason) if self.domain in (ERROR_DOMAIN, "", None) else None
        kw: dict[str, Any] = {
            "reason": ours or catalog_reason(self.code.name),
            "metadata": self.metadata if ours else None,
        }
        cls = _BY_CODE.get(self.code, Unavailable)
        if cls is InvalidArgument:
            kw["violations"] = dict(self.field_violations)
        if cls is ResourceExhausted:
            kw["violations"] = self.quota_violations
        if cls in (ResourceExhausted, Unavailable, Aborted):
            kw["retry_after"] = self.retry_after
        error = cls(self.message, **kw)
        error.peer = self
        return error

    def as_dict(self) -> dict:
        """The plain-dict shape error_details() returns."""
        return {
            "reason": self.reason,
            "domain": self.domain,
            "metadata": dict(self.metadata),
            "bad_request": dict(self.field_violations),
            "quota": list(self.quota_violations),
            "retry_after": self.retry_after,
        }


_DETAIL_KINDS = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.QuotaFailure,
    error_details_pb2.RetryInfo,
)


def _decoded(msg: Any) -> dict[str, Any]:
    if isinstance(msg, error_details_pb2.ErrorInfo):
        return {"reason": msg.reason, "domain": msg.domain, "metadata": MappingProxyType(dict(msg.metadata))}
    if isinstance(msg, error_details_pb2.BadRequest):
        return {"field_violations": tuple((v.field, v.description) for v in msg.field_violations)}
    if isinstance(msg, error_details_pb2.QuotaFailure):
        return {"quota_violations": tuple((v.subject, v.description) for v in msg.violations)}
    return {"retry_after": msg.retry_delay.ToNanoseconds() / 1e9}


_BY_CODE: dict[grpc.StatusCode, type[BulkheadError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Unauthenticated,
        PermissionDenied,
        FailedPrecondition,
        Aborted,
        Unavailable,
        ResourceExhausted,
    )
}


def from_peer(rpc_error: grpc.RpcError) -> BulkheadError:
    """A peer's failed call as our own error (RpcFailure.to_error); the typed failure is on its `.peer`."""
    return RpcFailure.of(rpc_error).to_error()


@contextlib.contextmanager
def peer_call() -> Iterator[None]:
    """Every call to a peer runs inside this: a failed call leaves it as our own error (from_peer), so a
    caller's special cases catch our classes (`except errors.NotFound`) and the rest reaches our caller.

        with peer_call():
            reply = await stub.GetTenant(request, timeout=3.0)
    """
    try:
        yield
    except grpc.RpcError as err:
        raise from_peer(err) from None


def error_details(rpc_error: grpc.RpcError) -> dict:
    """The google.rpc details of a failed call as a plain dict (for tests); code uses RpcFailure.of."""
    return RpcFailure.of(rpc_error).as_dict()
