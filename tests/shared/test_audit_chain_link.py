"""shared.audit_chain.link is a stored format: the hashes of chains already written must come out the
same after any change to how it is computed (issue 16 made it cheaper, not different)."""

from __future__ import annotations

from shared import audit_chain

FIELDS = {
    "seq": 7,
    "time_us": 1765000000000001,
    "principal_id": "p_x",
    "actor_id": "",
    "agent_id": "ag",
    "run_id": "",
    "request_id": "req",
    "secret_name": "caf\u00e9",
    "version": 3,
    "action": "get",
    "outcome": "allowed",
    "reason": "",
}
PREV = "a" * 64


def test_link_hashes_are_the_ones_chains_were_written_with():
    """HMAC-SHA-256 (with a key) and SHA-256 (without) over prev hash + sorted, compact, ASCII-escaped JSON."""
    assert (
        audit_chain.link(PREV, FIELDS, b"k" * 32) == "67ce4de796a55aa3e1636e802b319117875f780e84781c5a0c964c01c84357b6"
    )
    assert audit_chain.link(PREV, FIELDS) == "a192efe848fe9c433c845347ee707b837c1f8c7f9fcf099d6239519c47a0d6b7"


def test_field_order_does_not_matter_and_every_field_counts():
    """The same fields in another order hash the same; any changed value, or another key, does not."""
    reordered = dict(reversed(list(FIELDS.items())))
    assert audit_chain.link(PREV, reordered, b"k") == audit_chain.link(PREV, FIELDS, b"k")
    for name in FIELDS:
        changed = {**FIELDS, name: f"{FIELDS[name]}x"}
        assert audit_chain.link(PREV, changed, b"k") != audit_chain.link(PREV, FIELDS, b"k"), name
    assert audit_chain.link(PREV, FIELDS, b"k") != audit_chain.link(PREV, FIELDS, b"j")
