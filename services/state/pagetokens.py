"""Opaque page tokens for keyset pagination, bound to the query they continue."""
from __future__ import annotations

import base64
import hashlib
import json

from shared.errors import InvalidArgument

_REASON = "INVALID_PAGE_TOKEN"


def query_fingerprint(*parts: object) -> str:
    """A short digest of a query's filters, so a token is only accepted by the query that made it."""
    raw = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def encode(fingerprint: str, after: str | int) -> str:
    """A token meaning 'continue the query `fingerprint` after position `after`'."""
    raw = json.dumps({"q": fingerprint, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, fingerprint: str, *, kind: type) -> str | int:
    """The position a token continues from; InvalidArgument when it is malformed or from another query."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after = data["a"]
        query = data["q"]
    except (ValueError, TypeError, KeyError):
        raise _invalid("page_token is malformed") from None
    # bool is an int subclass in Python; neither it nor a wrong type is a valid position.
    if type(after) is not kind or query != fingerprint:
        raise _invalid("page_token does not belong to this query")
    if isinstance(after, int) and after < 0:
        raise _invalid("page_token is malformed")
    return after


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason=_REASON, violations={"page_token": message})
