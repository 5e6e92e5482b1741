"""A hash chain for append-only audit logs: each entry's hash covers the previous hash and its
own fields, so changing, reordering or removing an entry breaks every hash after it.

Pure functions, no storage: a service keeps the entries and a chain head in its own tables and
calls `link` when appending and `verify` when checking. With a `key` the links are HMACs, so
someone who can write the table but does not hold the key cannot rebuild a consistent chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

GENESIS = "0" * 64
"""The `prev_hash` of the first entry of a chain."""

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
"""json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str), built once:
the same text (every stored hash stays valid), without a new encoder per entry."""


def link(prev_hash: str, fields: Mapping[str, object], key: bytes = b"") -> str:
    """The hash of an entry over the previous hash and the entry's canonical JSON: HMAC-SHA-256
    with `key`, plain SHA-256 without one."""
    canonical = _CANONICAL.encode(dict(fields))
    message = f"{prev_hash}\n{canonical}".encode()
    if key:
        return hmac.digest(key, message, "sha256").hex()  # = hmac.new(...).hexdigest(), in one C call
    return hashlib.sha256(message).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainEntry:
    """One stored entry as the verifier sees it."""

    sequence: int
    """Position in the chain, from 1, without gaps."""
    fields: Mapping[str, object]
    """Exactly the fields that were hashed when the entry was appended."""
    prev_hash: str
    """The hash stored as the previous entry's."""
    hash: str
    """The hash stored for this entry."""


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of a verification."""

    intact: bool
    """True when every entry links and the head matches."""
    checked: int
    """How many entries were read."""
    first_bad_sequence: int = 0
    """Where the chain first breaks; 0 when intact."""
    problem: str = ""
    """What is wrong, in words."""


def verify(
    entries: Iterable[ChainEntry],
    *,
    head_sequence: int,
    head_hash: str,
    key: bytes = b"",
    anchor_sequence: int = 0,
    anchor_hash: str = GENESIS,
) -> ChainReport:
    """Check entries (in sequence order) against each other and against the recorded head.

    A changed entry fails its own hash; a removed one leaves a gap in the sequence (or, at the
    end, a chain shorter than the head says); a reordered one fails the link.

    After retention pruned the oldest entries, the chain starts at its anchor: the last pruned
    entry's sequence and hash, recorded apart from the entries. The first kept entry must then be
    anchor_sequence + 1 and link to anchor_hash, so removing the oldest kept entries, or moving
    the anchor without pruning exactly up to it, is caught like any other gap or broken link.
    """
    if anchor_sequence < 0 or anchor_sequence > head_sequence:
        return ChainReport(
            False,
            0,
            max(anchor_sequence, 1),
            f"the anchor (entry {anchor_sequence}) is not within the chain (head {head_sequence})",
        )
    prev, expected_seq, checked = (anchor_hash or GENESIS), anchor_sequence + 1, 0
    for entry in entries:
        checked += 1
        if entry.sequence != expected_seq:
            return ChainReport(False, checked, expected_seq, f"entry {expected_seq} is missing")
        if entry.prev_hash != prev:
            return ChainReport(
                False, checked, entry.sequence, f"entry {entry.sequence} does not link to the one before"
            )
        if not hmac.compare_digest(link(prev, entry.fields, key), entry.hash):
            return ChainReport(
                False, checked, entry.sequence, f"entry {entry.sequence} was changed after it was written"
            )
        prev, expected_seq = entry.hash, expected_seq + 1
    last = expected_seq - 1
    if last != head_sequence:
        return ChainReport(
            False,
            checked,
            min(last, head_sequence) + 1,
            f"the chain ends at entry {last} but the head records {head_sequence}",
        )
    if prev != (head_hash or GENESIS):
        return ChainReport(False, checked, max(last, 1), f"entry {last} does not match the recorded head")
    return ChainReport(True, checked)
