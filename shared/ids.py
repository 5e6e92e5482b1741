"""Ids, and the one tenant-id rule (docs/CONTRACT.md, "Ids") every service, tool and test checks against.

A tenant id is `t_` followed by 1 to 60 lower-case letters or digits. Identity mints
`t_` + 16 lower-case base32 characters (services/identity/credentials.py `new_id`); the platform tenant
is `t_platform`. No underscore after the prefix: an API key `bk_<tenant id>_<key id>_<secret>` then
splits one way only, and the id is safe as it is in schema, database, path and policy names.
"""

from __future__ import annotations

import re

from shared.errors import InvalidArgument, Reason

TENANT_ID_PATTERN = r"t_[a-z0-9]{1,60}"
"""The rule as a regular expression without anchors (to embed, e.g. in the API key's pattern)."""
_TENANT_ID = re.compile(TENANT_ID_PATTERN)
TENANT_ID_HINT = "t_ and 1-60 lower-case letters or digits, as identity returned it"
"""What a BadRequest field violation says a tenant id must look like."""


def is_tenant_id(value: str | None) -> bool:
    """Whether value is a well-formed tenant id (it says nothing about whether the tenant exists)."""
    return bool(value) and _TENANT_ID.fullmatch(value) is not None  # type: ignore[arg-type]


def check_tenant_id(value: str | None, field: str = "tenant_id") -> str:
    """value, if it is a well-formed tenant id; else InvalidArgument INVALID_TENANT_ID naming field."""
    if not is_tenant_id(value):
        raise InvalidArgument(
            f"{field} is missing or malformed" if value else f"{field} is required",
            reason=Reason.INVALID_TENANT_ID,
            violations={field: TENANT_ID_HINT},
        )
    return value  # type: ignore[return-value]
