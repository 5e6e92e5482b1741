"""The one pager: Page, page_size() and page tokens that are opaque and tamper-evident.

A token is base64url(version | MAC | cursor). The MAC is an HMAC-SHA256, under the service's page key,
over the version, the full method name of the RPC that issued it, the tenant it was issued to, a
digest of the request's filters and the keyset cursor. So a token is accepted only by the RPC that
issued it, for the same tenant and the same filters, unaltered; anything else is INVALID_ARGUMENT with
the one reason INVALID_PAGE_TOKEN. The server interceptor binds the RPC's method and the page key
(shared.settings.load_page_key: one random key per service in its platform database) for each call.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from shared.errors import InvalidArgument, Reason
from shared.tenancy import current_tenant

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

REASON = Reason.INVALID_PAGE_TOKEN
"""The ErrorInfo reason of every page token that is refused, whatever is wrong with it."""

MESSAGE = (
    "page_token is not valid for this call (issued by another method, to another tenant, for other "
    "filters, or altered): restart listing from the first page with an empty page_token"
)
"""The one message of a refused token: the caller's remedy is always the same."""

_VERSION = 1
_MAC_BYTES = 16

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of results and the token for the next (empty at the end)."""

    items: list[T]
    """The results of this page."""
    next_page_token: str = ""
    """The token of the next page; empty when this is the last."""


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """The page size to use: the default for 0, capped at the maximum; negative is refused."""
    if requested < 0:
        raise InvalidArgument(
            "page_size must not be negative",
            reason=Reason.INVALID_PAGE_SIZE,
            violations={"page_size": f"0 to {maximum}"},
        )
    return min(requested or default, maximum)


@dataclass(frozen=True)
class _Scope:
    method: str
    key: bytes


_EPHEMERAL = secrets.token_bytes(32)
"""The key outside a served call (in-process paging, e.g. bootstrap): valid only in this process."""

_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("bulkhead_paging", default=None)


def bind(method: str, key: bytes | None) -> contextvars.Token:
    """Bind the running RPC's full method name and the service's page key (the interceptor does this)."""
    return _scope.set(_Scope(method, key or _EPHEMERAL))


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    raise TypeError(f"cannot put {type(value).__name__} in a page token")


def _hook(obj: dict) -> object:
    return datetime.fromisoformat(obj["$dt"]) if set(obj) == {"$dt"} else obj


def _mac(key: bytes, method: str, tenant: str, filters: object, cursor: bytes) -> bytes:
    digest = hashlib.sha256(json.dumps(filters, sort_keys=True, separators=(",", ":"), default=str).encode()).digest()
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (bytes([_VERSION]), method.encode(), tenant.encode(), digest, cursor):
        mac.update(len(part).to_bytes(4, "big"))  # length-prefixed: no two tuples share a message
        mac.update(part)
    return mac.digest()[:_MAC_BYTES]


def _context() -> tuple[bytes, str, str]:
    scope = _scope.get()
    tenant = current_tenant()
    return (scope.key if scope else _EPHEMERAL, scope.method if scope else "", tenant.tenant_id if tenant else "")


def encode(cursor: Any, *, filters: object = ()) -> str:
    """The token that continues this RPC's listing after `cursor` (JSON values and datetimes), for these filters."""
    key, method, tenant = _context()
    raw = json.dumps(cursor, default=_default, separators=(",", ":")).encode()
    body = bytes([_VERSION]) + _mac(key, method, tenant, filters, raw) + raw
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode(token: str, *, filters: object = ()) -> Any:
    """The cursor a token continues from (None for the first page); InvalidArgument when this RPC, tenant
    and filters did not issue it, or it was altered."""
    if not token:
        return None
    key, method, tenant = _context()
    try:
        if len(token) % 4 == 1 or "=" in token:
            raise ValueError("not canonical base64url")
        body = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        # Only the canonical spelling: a token that decodes to the same bytes under another spelling
        # is an altered token too.
        if base64.urlsafe_b64encode(body).decode().rstrip("=") != token:
            raise ValueError("not canonical base64url")
        version, mac, raw = body[0], body[1 : 1 + _MAC_BYTES], body[1 + _MAC_BYTES :]
        if version != _VERSION or not hmac.compare_digest(mac, _mac(key, method, tenant, filters, raw)):
            raise ValueError("wrong version or MAC")
        return json.loads(raw, object_hook=_hook)
    except (binascii.Error, ValueError, IndexError, UnicodeDecodeError):
        raise invalid_token() from None


def invalid_token() -> InvalidArgument:
    """The one error of a refused page token."""
    return InvalidArgument(MESSAGE, reason=Reason.INVALID_PAGE_TOKEN, violations={"page_token": MESSAGE})


def keyset(rows: Sequence[T], size: int, cursor_of, *, filters: object = ()) -> Page[T]:
    """The page of `rows` fetched with limit size + 1: the first `size`, and a token after the last of them."""
    more = len(rows) > size
    items = list(rows[:size])
    return Page(items, encode(cursor_of(items[-1]), filters=filters) if more and items else "")


def offset_page(items: Sequence[T], size: int, token: str, *, filters: object = ()) -> Page[T]:
    """A page of `size` (from page_size()) of a listing computed whole in memory (e.g. reports), by position."""
    offset = decode(token, filters=filters) or 0
    if type(offset) is not int or offset < 0:
        raise invalid_token()  # a MAC-valid token of ours always holds a position; defensive
    end = offset + size
    return Page(list(items[offset:end]), encode(end, filters=filters) if end < len(items) else "")
