"""Deletion receipts: what each service destroyed and kept, as canonical JSON signed with Ed25519.

The body holds ids, counts, store names, key ids and reasons: never row data, checksums of row
data (a hash of a short secret can be guessed) or secrets. `bulkhead receipts verify` checks it
offline (bulkhead_cli/receipts.py): the canonical form is `json.dumps(body, sort_keys=True,
separators=(",", ":"))`, so a saved, re-read receipt verifies byte for byte.
"""

from __future__ import annotations

import json
from datetime import datetime

from services.identity.signing import as_utc
from services.identity.store import DeletionRow, DeletionStepRow
from shared.tokens import SigningKey, public_key_bytes

RECEIPT_KIND = "bulkhead.tenant-deletion-receipt/v1"


def canonical(body: dict) -> bytes:
    """The bytes a receipt's signature covers."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _service(step: DeletionStepRow) -> dict:
    inventory = json.loads(step.inventory or "{}")
    result = json.loads(step.result or "{}")
    held = [
        {"store": t.get("store", ""), "table": t["table"], "rows": int(t.get("rows", 0))}
        for t in inventory.get("tables", [])
        if int(t.get("rows", 0))
    ]
    return {
        "service": step.service,
        "rows_before": held,
        "rows_deleted": sum(int(t.get("rows", 0)) for t in result.get("deleted", [])),
        "dropped_stores": list(result.get("droppedStores", [])),
        "destroyed_keys": [
            {"key_id": k["keyId"], "backend": k.get("backend", "")} for k in result.get("destroyedKeys", [])
        ],
        "kept": [
            {
                "store": k.get("store", ""),
                "table": k["table"],
                "rows": int(k.get("rows", 0)),
                "reason": k.get("reason", ""),
            }
            for k in result.get("kept", [])
        ],
        "actions": [{"name": a["name"], "count": int(a.get("count", 0))} for a in result.get("actions", [])],
    }


def build_receipt(row: DeletionRow, steps: list[DeletionStepRow], *, completed_at: datetime, region: str) -> bytes:
    """The canonical receipt body of a finished deletion."""
    body = {
        "kind": RECEIPT_KIND,
        "issuer": "bulkhead-identity",
        "tenant_id": row.tenant_id,
        "tier": row.tier,
        "region": region,
        "requested_at": as_utc(row.requested_at).isoformat(),
        "completed_at": as_utc(completed_at).isoformat(),
        "services": [_service(s) for s in sorted(steps, key=lambda s: s.position)],
    }
    return canonical(body)


def sign_receipt(key: SigningKey, body: bytes) -> bytes:
    """Ed25519 signature of the body with identity's signing key."""
    return key.private_key.sign(body)


def receipt_public_key(key: SigningKey) -> bytes:
    """The 32 raw bytes that verify it."""
    return public_key_bytes(key.public_key)
