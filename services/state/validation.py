"""Input checks for the state service: each failure is an InvalidArgument with a precise reason."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from services.state.records import Limits, NewEventRecord
from shared.errors import InvalidArgument

_THREAD_ID = re.compile(r"[a-z0-9_-]{1,64}")
_CONTEXT_KEY = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
_LABEL_KEY = re.compile(r"[a-z0-9_./-]{1,63}")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_MAX_REF = 128  # run, agent, scope ids and label values


def invalid(field: str, message: str, reason: str, **metadata: str) -> InvalidArgument:
    """An InvalidArgument for one field."""
    return InvalidArgument(message, reason=reason, violations={field: message}, metadata=metadata)


def thread_id(value: str, field: str = "thread_id") -> str:
    """A thread id given by the caller."""
    if not _THREAD_ID.fullmatch(value):
        raise invalid(field, "thread_id must be 1-64 characters of [a-z0-9_-]", "INVALID_THREAD_ID")
    return value


def reference(value: str, field: str) -> str:
    """A run, agent or scope id: free-form but bounded."""
    if len(value) > _MAX_REF or any(ord(c) < 32 for c in value):
        raise invalid(field, f"{field} must be at most {_MAX_REF} printable characters", "INVALID_REFERENCE")
    return value


def labels(values: Mapping[str, str], limits: Limits, field: str = "labels") -> dict[str, str]:
    """Thread labels (or a label filter)."""
    if len(values) > limits.max_labels:
        raise invalid(
            field,
            f"at most {limits.max_labels} labels (limit max_labels)",
            "TOO_MANY_LABELS",
            limit="max_labels",
            max=str(limits.max_labels),
        )
    for key, value in values.items():
        if not _LABEL_KEY.fullmatch(key):
            raise invalid(f"{field}[{key!r}]", "label keys are 1-63 characters of [a-z0-9_./-]", "INVALID_LABEL")
        reference(value, f"{field}[{key!r}]")
    return dict(values)


def version(value: int, field: str) -> int:
    """A version number: never negative."""
    if value < 0:
        raise invalid(field, f"{field} must not be negative", "INVALID_VERSION")
    return value


def new_events(events: Sequence[NewEventRecord], limits: Limits) -> Sequence[NewEventRecord]:
    """The events of one append: at least one, within the count and size limits."""
    if not events:
        raise invalid("events", "at least one event is required", "NO_EVENTS")
    if len(events) > limits.max_events_per_append:
        raise invalid(
            "events",
            f"{len(events)} events exceed the limit max_events_per_append ({limits.max_events_per_append})",
            "TOO_MANY_EVENTS",
            limit="max_events_per_append",
            max=str(limits.max_events_per_append),
        )
    for i, event in enumerate(events):
        if not _EVENT_TYPE.fullmatch(event.type):
            raise invalid(f"events[{i}].type", "type must be 1-64 characters of [A-Za-z0-9_.:/-]", "INVALID_EVENT_TYPE")
        if len(event.payload) > limits.max_event_bytes:
            raise invalid(
                f"events[{i}].payload",
                f"payload of {len(event.payload)} bytes exceeds the limit max_event_bytes ({limits.max_event_bytes})",
                "EVENT_TOO_LARGE",
                limit="max_event_bytes",
                max=str(limits.max_event_bytes),
            )
    return events


def snapshot_state(state: bytes, limits: Limits) -> bytes:
    """A snapshot's state, within the size limit."""
    if len(state) > limits.max_snapshot_bytes:
        raise invalid(
            "state",
            f"state of {len(state)} bytes exceeds the limit max_snapshot_bytes ({limits.max_snapshot_bytes})",
            "SNAPSHOT_TOO_LARGE",
            limit="max_snapshot_bytes",
            max=str(limits.max_snapshot_bytes),
        )
    return state


def context_key(value: str) -> str:
    """A context key."""
    if not _CONTEXT_KEY.fullmatch(value):
        raise invalid("key", "key must be 1-128 characters of [A-Za-z0-9_.:/-]", "INVALID_KEY")
    return value


def scope_id(value: str) -> str:
    """The team or run id of a context scope."""
    if not value:
        raise invalid("scope.id", "scope.id is required", "INVALID_SCOPE")
    return reference(value, "scope.id")


def context_value(value: bytes, limits: Limits) -> bytes:
    """A context value, within the size limit."""
    if len(value) > limits.max_value_bytes:
        raise invalid(
            "value",
            f"value of {len(value)} bytes exceeds the limit max_value_bytes ({limits.max_value_bytes})",
            "VALUE_TOO_LARGE",
            limit="max_value_bytes",
            max=str(limits.max_value_bytes),
        )
    return value
