"""What the state service's domain returns: plain records with decrypted contents, no grpc, no ORM."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ScopeKind(enum.IntEnum):
    """What a context scope is attached to (values match the proto enum)."""

    TEAM = 1
    RUN = 2


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    """A thread's metadata and version."""

    thread_id: str
    run_id: str
    agent_id: str
    labels: dict[str, str]
    version: int
    created_at_us: int
    updated_at_us: int


@dataclass(frozen=True, slots=True)
class NewEventRecord:
    """An event to append."""

    type: str
    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An appended event, decrypted."""

    version: int
    type: str
    payload: bytes = field(repr=False)
    created_at_us: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """A materialised state of a thread as of a version, decrypted."""

    thread_id: str
    version: int
    state: bytes = field(repr=False)
    created_at_us: int = 0


@dataclass(frozen=True, slots=True)
class ContextRecord:
    """One context value, decrypted."""

    kind: ScopeKind
    scope_id: str
    key: str
    value: bytes = field(repr=False)
    revision: int = 0
    expires_at_us: int | None = None
    updated_at_us: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits; a request over one fails with INVALID_ARGUMENT naming the limit."""

    max_event_bytes: int = 256 * 1024
    """Largest event payload."""
    max_events_per_append: int = 1000
    """Most events in one AppendEvents call."""
    max_snapshot_bytes: int = 4 * 1024 * 1024 - 64 * 1024
    """Largest snapshot state (kept under gRPC's default 4 MiB message)."""
    max_value_bytes: int = 256 * 1024
    """Largest context value."""
    max_labels: int = 32
    """Most labels on a thread."""
    default_page_size: int = 100
    """Page size when the caller gives none."""
    max_page_size: int = 1000
    """Larger page sizes are reduced to this."""
    replay_batch: int = 500
    """Events read per database round trip while streaming a replay."""
