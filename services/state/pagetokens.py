"""Page tokens of the state service: shared.paging cursors, bound to the query they continue."""
from __future__ import annotations

import hashlib
import json

from shared.errors import InvalidArgument
from shared.paging import decode_cursor, encode_cursor

REASON = "BAD_PAGE_TOKEN"
"""The ErrorInfo reason of every bad token (the same as shared.paging's)."""


def query_fingerprint(*parts: object) -> str:
    """A short digest of a query's filters, so a token is only accepted by the query that made it."""
    raw = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def encode(fingerprint: str, after: str | int) -> str:
    """A token meaning 'continue the query `fingerprint` after position `after`'."""
    return encode_cursor({"q": fingerprint, "a": after})


def decode(token: str, fingerprint: str, *, kind: type) -> str | int:
    """The position a token continues from; InvalidArgument when it is malformed or from another query."""
    position = decode_cursor(token) or {}
    after = position.get("a")
    # bool is an int subclass in Python; neither it nor a wrong type is a valid position.
    if type(after) is not kind or (kind is int and after < 0):
        raise _invalid("page_token is malformed: pass back a next_page_token unchanged")
    if position.get("q") != fingerprint:
        raise _invalid("page_token belongs to another query: keep the filters of the first call")
    return after


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason=REASON, violations={"page_token": message})
