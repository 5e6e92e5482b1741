"""Page tokens: opaque to clients, a keyset cursor to us. A malformed token is INVALID_ARGUMENT."""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from shared.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of results and the token for the next (empty at the end)."""

    items: list[T]
    next_page_token: str


def page_size(requested: int) -> int:
    """The page size to use: the default for 0, capped at MAX_PAGE_SIZE; negative is refused."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", violations={"page_size": "0 to 500"})
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _default(value):
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    raise TypeError(f"cannot put {type(value).__name__} in a page token")


def _hook(obj: dict):
    return datetime.fromisoformat(obj["$dt"]) if set(obj) == {"$dt"} else obj


def encode_cursor(position: dict) -> str:
    """A page token for the position after which the next page starts."""
    raw = json.dumps(position, default=_default, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> dict | None:
    """The position a page token names; None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        position = json.loads(raw, object_hook=_hook)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidArgument("malformed page_token: pass back the next_page_token of a previous response",
                              violations={"page_token": "not a token this service issued"}, reason="BAD_PAGE_TOKEN") from None
    if not isinstance(position, dict):
        raise InvalidArgument("malformed page_token", violations={"page_token": "not a token this service issued"},
                              reason="BAD_PAGE_TOKEN")
    return position
