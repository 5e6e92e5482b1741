"""Canary markers: each tenant's prompts carry its own marker; an output holding another's is blocked.

A marker is an HMAC of the tenant id under the service's canary key, so it cannot be guessed
from the tenant id and needs no table. Any marker-shaped string that is not the run's own
tenant marker counts as foreign: it could only have come from another tenant's data.
"""

from __future__ import annotations

import hashlib
import hmac
import re

_MARKER = re.compile(r"bkc_[0-9a-f]{20}")


def marker_for(tenant_id: str, key: bytes) -> str:
    """The canary marker of one tenant."""
    return "bkc_" + hmac.new(key, tenant_id.encode(), hashlib.sha256).hexdigest()[:20]


def foreign_markers(text: str, own_marker: str) -> list[str]:
    """Markers in text that belong to someone other than the owner (in order, unique)."""
    seen: list[str] = []
    for m in _MARKER.findall(text):
        if m != own_marker and m not in seen:
            seen.append(m)
    return seen


def fingerprint(marker: str) -> str:
    """A short, non-reversible id of a marker for the record (the marker itself is not repeated)."""
    return hashlib.sha256(marker.encode()).hexdigest()[:12]
