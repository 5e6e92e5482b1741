"""The one range every 64-bit integer of a request must lie in, and finite JSON numbers, checked at the edge
of every RPC.

Counts, limits and prices are summed and multiplied downstream (ledgers, budgets, chargeback);
a value near 2**63 overflows the database's BIGINT before any domain check can say what is wrong.
Services still check their own domains (no negative counts, a commit within its hold...): this
is the floor under all of them, so no request can reach INTERNAL through an integer. Likewise a
google.protobuf.Value (a Struct's JSON: tool schemas, tool inputs) may not hold Infinity or NaN, which
JSON cannot carry and protobuf's JSON conversion refuses deep inside a handler.
"""

from __future__ import annotations

import math
from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

MAX_SAFE_INTEGER = 2**53 - 1
"""The largest integer every client language carries exactly (JavaScript's Number included)."""

_WIDE = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED64,
}


def _checked(field: FieldDescriptor) -> bool:
    """A 64-bit integer, or the number of a JSON Value."""
    owner = field.containing_type
    return field.type in _WIDE or (
        field.type == FieldDescriptor.TYPE_DOUBLE and owner is not None and owner.full_name == "google.protobuf.Value"
    )


@cache
def _plan(descriptor: Descriptor) -> tuple[tuple[FieldDescriptor, bool], ...]:
    """The fields of a message type worth visiting: (field, is_message). Empty when no checked number is reachable."""
    return tuple(
        (f, f.type == FieldDescriptor.TYPE_MESSAGE)
        for f in descriptor.fields
        if _checked(f) or (f.type == FieldDescriptor.TYPE_MESSAGE and _reaches_wide(f.message_type))
    )


@cache
def _reaches_wide(descriptor: Descriptor, _seen: frozenset = frozenset()) -> bool:
    if descriptor.full_name in _seen:
        return False
    seen = _seen | {descriptor.full_name}
    return any(
        _checked(f) or (f.type == FieldDescriptor.TYPE_MESSAGE and _reaches_wide(f.message_type, seen))
        for f in descriptor.fields
    )


def number_violations(message: Message, *, limit: int = MAX_SAFE_INTEGER) -> dict[str, str]:
    """Field path -> problem for every 64-bit integer in message beyond ±limit and every JSON number that is not
    finite; empty when all are fine."""
    plan = _plan(message.DESCRIPTOR)
    if not plan or _clean(message, _scan_plan(message.DESCRIPTOR), limit):
        return {}
    problems: dict[str, str] = {}
    _visit(message, plan, "", limit, problems)
    return problems


# How _clean reads a field: a number (int or JSON float), repeated numbers, a message, repeated messages,
# a map to numbers, a map to messages.
_INT, _FLOAT, _INTS, _MESSAGE, _MESSAGES, _INT_MAP, _MESSAGE_MAP = range(7)


@cache
def _scan_plan(descriptor: Descriptor) -> tuple[tuple[str, int, Descriptor | None], ...]:
    """_plan's fields as (attribute, how to read it, message type to descend into)."""
    out = []
    for field, is_message in _plan(descriptor):
        entry = field.message_type if is_message else None
        if field.is_repeated and entry is not None and entry.GetOptions().map_entry:
            value = entry.fields_by_name["value"]
            nested = value.type == FieldDescriptor.TYPE_MESSAGE
            out.append((field.name, _MESSAGE_MAP if nested else _INT_MAP, value.message_type if nested else None))
        elif is_message:
            out.append((field.name, _MESSAGES if field.is_repeated else _MESSAGE, field.message_type))
        elif field.is_repeated:
            out.append((field.name, _INTS, None))
        else:
            out.append((field.name, _FLOAT if field.type == FieldDescriptor.TYPE_DOUBLE else _INT, None))
    return tuple(out)


def _clean(message: Message, plan, limit: int) -> bool:
    """Whether every checked number in message is fine: the common case, answered without building field
    paths (a RecordUsage batch of 1,000 events is checked about 3x faster than by _visit)."""
    for name, how, nested in plan:
        value = getattr(message, name)
        if how == _INT:
            if not -limit <= value <= limit:
                return False
        elif how == _MESSAGES:
            sub = _scan_plan(nested)
            for item in value:
                if not _clean(item, sub, limit):
                    return False
        elif how == _MESSAGE:
            if message.HasField(name) and not _clean(value, _scan_plan(nested), limit):
                return False
        elif how == _FLOAT:
            if not math.isfinite(value):
                return False
        elif how == _INTS:
            if value and not (-limit <= min(value) and max(value) <= limit):
                return False
        elif how == _INT_MAP:
            if value and not (-limit <= min(value.values()) and max(value.values()) <= limit):
                return False
        else:  # _MESSAGE_MAP
            sub = _scan_plan(nested)
            for item in value.values():
                if not _clean(item, sub, limit):
                    return False
    return True


def _visit(message: Message, plan, prefix: str, limit: int, problems: dict[str, str]) -> None:
    for field, is_message in plan:
        name = prefix + field.name
        value = getattr(message, field.name)
        if field.is_repeated:
            if is_message and field.message_type.GetOptions().map_entry:
                items = value.items()
                value_field = field.message_type.fields_by_name["value"]
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    sub = _plan(value_field.message_type)
                    for key, item in items:
                        _visit(item, sub, f"{name}[{key}].", limit, problems)
                else:
                    for key, item in items:
                        _check(item, f"{name}[{key}]", limit, problems)
                continue
            for i, item in enumerate(value):
                if is_message:
                    _visit(item, _plan(field.message_type), f"{name}[{i}].", limit, problems)
                else:
                    _check(item, f"{name}[{i}]", limit, problems)
        elif is_message:
            if message.HasField(field.name):
                _visit(value, _plan(field.message_type), name + ".", limit, problems)
        else:
            _check(value, name, limit, problems)


def _check(value: float, name: str, limit: int, problems: dict[str, str]) -> None:
    if isinstance(value, float):
        if not math.isfinite(value):
            problems[name] = "not a JSON number: must be finite (no Infinity or NaN)"
    elif not -limit <= value <= limit:
        problems[name] = f"out of range: must lie within \u00b1{limit} (2**53 - 1)"
