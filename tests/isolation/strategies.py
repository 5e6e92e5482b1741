"""Hypothesis strategies for any request message, derived from its descriptor (nothing hand-listed).

Every field type is covered: scalars at their extremes, long and unicode strings, open enums
(unknown numbers too), nested messages down to a depth, repeated fields, maps and oneofs (at most
one member set). Metadata strategies make odd extra keys, malformed bearers and odd tenant ids.
"""

from __future__ import annotations

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

MAX_DEPTH = 4
"""Nested messages below this are left unset: Struct/Value recurse without end."""

_F = FieldDescriptor
_INT_RANGES = {
    _F.TYPE_INT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _F.TYPE_INT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _F.TYPE_UINT32: (0, 2**32 - 1),
    _F.TYPE_FIXED32: (0, 2**32 - 1),
    _F.TYPE_UINT64: (0, 2**64 - 1),
    _F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """The range's edges, small numbers around zero, and anything between."""
    edges = [v for v in (lo, lo + 1, -1, 0, 1, 2**31 - 1, 2**31, 2**53, hi - 1, hi) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -1000), min(hi, 1000)), st.integers(lo, hi))


# Lone surrogates cannot be encoded as UTF-8, so protobuf refuses them client-side: not a server input.
_UNICODE = st.characters(blacklist_categories=("Cs",))
_IDLIKE = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-.:/", max_size=40)
STRINGS = st.one_of(
    st.just(""),
    _IDLIKE,
    st.text(_UNICODE, max_size=60),
    st.text(_UNICODE, min_size=1, max_size=4).map(lambda s: s * 1500),  # long: thousands of code points
    st.sampled_from(
        [
            "../../etc/passwd",
            "a/b",
            "%00",
            "\x00",
            " ",
            "NULL",
            "'; DROP TABLE x; --",
            "t_platform",
            "*",
            "\u202e",
            "\U0001f600" * 3,
            "x" * 256,
            "x" * 257,
        ]
    ),
)
BYTES = st.one_of(st.just(b""), st.binary(max_size=64), st.binary(min_size=1, max_size=4).map(lambda b: b * 4000))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324]))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    t = field.type
    if t in _INT_RANGES:
        return _ints(*_INT_RANGES[t])
    if t == _F.TYPE_BOOL:
        return st.booleans()
    if t in (_F.TYPE_FLOAT, _F.TYPE_DOUBLE):
        return FLOATS if t == _F.TYPE_DOUBLE else FLOATS.map(lambda f: f if abs(f) < 3e38 or f != f else 3e38)
    if t == _F.TYPE_STRING:
        return STRINGS
    if t == _F.TYPE_BYTES:
        return BYTES
    if t == _F.TYPE_ENUM:  # proto3 enums are open: numbers the enum does not name reach the server too
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), _ints(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for field type {t} of {field.full_name}")


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == _F.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return _scalar(field)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == _F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


@st.composite
def _fill(draw, descriptor: Descriptor, depth: int):
    msg = message_factory.GetMessageClass(descriptor)()
    if depth > MAX_DEPTH:
        return msg
    oneofs = [o for o in descriptor.oneofs if not _synthetic(o)]
    in_oneof = {f.name for o in oneofs for f in o.fields}
    for field in descriptor.fields:
        if field.name not in in_oneof:
            _draw_field(draw, msg, field, depth)
    for oneof in oneofs:  # at most one member: setting a second would only clear the first
        chosen = draw(st.none() | st.sampled_from(list(oneof.fields)))
        if chosen is not None:
            _draw_field(draw, msg, chosen, depth, always=True)
    return msg


def _synthetic(oneof) -> bool:
    """The oneof protoc makes for a proto3 `optional` field: a plain field with presence."""
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


def _draw_field(draw, msg, field: FieldDescriptor, depth: int, *, always: bool = False) -> None:
    if not always and not draw(st.booleans()):
        return  # unset: the default every server must handle anyway
    if _is_map(field):
        key_f, val_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(_scalar(key_f), _value(val_f, depth), max_size=3))
        target = getattr(msg, field.name)
        for k, v in entries.items():
            if val_f.type == _F.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
        return
    if field.is_repeated:
        values = draw(st.lists(_value(field, depth), max_size=4))
        target = getattr(msg, field.name)
        if field.type == _F.TYPE_MESSAGE:
            for v in values:
                target.add().CopyFrom(v)
        else:
            target.extend(values)
        return
    value = draw(_value(field, depth))
    if field.type == _F.TYPE_MESSAGE:
        getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Any message of this type: each field set or not, values anywhere in their type's range."""
    return _fill(descriptor, depth)


@st.composite
def _mutated(draw, valid):
    msg = type(valid)()
    msg.CopyFrom(valid)
    fields = list(valid.DESCRIPTOR.fields)
    for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2, unique_by=lambda f: f.name)):
        msg.ClearField(field.name)
        _draw_field(draw, msg, field, 1, always=True)
    return msg


def mutations(valid) -> st.SearchStrategy:
    """A valid request with one or two of its fields redrawn: past the first checks, into the handler."""
    return _mutated(valid) if valid.DESCRIPTOR.fields else st.just(valid)


# Metadata. Keys stay lower-case ASCII: for any other spelling gRPC itself answers INTERNAL
# "Illegal header key" to a raw HTTP/2 client, and the Python client refuses to send them
# (tests/shared/test_auth.py pins both), so no service could answer them differently.
_RESERVED = {
    "te",
    "host",
    "connection",
    "content-type",
    "content-length",
    "user-agent",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
}
_KEYS = st.one_of(
    st.from_regex(r"\Ax-[a-z0-9][a-z0-9_.-]{0,30}\Z"),
    st.sampled_from(
        [
            "traceparent",
            "tracestate",
            "baggage",
            "x-forwarded-for",
            "x-tenant",
            "tenant-id",
            "x-principal-id",
            "x-scope",
            "x-b3-traceid",
            "cookie",
            "x-api-key",
            "x-envoy-original-path",
        ]
    ),
).filter(lambda k: k not in _RESERVED and not k.startswith("grpc-"))
# Printable ASCII: the only characters a text metadata value may carry (the client refuses others).
_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
_BIN = st.binary(max_size=200)


def extra_metadata() -> st.SearchStrategy[list[tuple[str, str | bytes]]]:
    """Random extra keys (text, and -bin ones with bytes) a client or a proxy may add."""
    text = st.tuples(_KEYS, _VALUES)
    binary = st.tuples(_KEYS.map(lambda k: k + "-bin"), _BIN)
    return st.lists(st.one_of(text, binary), max_size=5, unique_by=lambda kv: kv[0])


def odd_bearers(token: str) -> st.SearchStrategy[str]:
    """authorization values that are not `Bearer <a valid token>` (printable ASCII: a tab or a control
    character is refused by the gRPC client itself, "Illegal header value", before any server sees it)."""
    head, _, _ = token.partition(".")
    return st.one_of(
        st.sampled_from(
            [
                "",
                "Bearer",
                "Bearer ",
                "bearer",
                "Basic dXNlcjpwYXNz",
                "Bearer .",
                "Bearer ..",
                f"Bearer {token}x",
                f"Bearer {token[:-4]}",
                f"Token {token}",
                f"Bearer {token} {token}",
                f"Bearer {head}",
                f"Bearer {token}.x",
            ]
        ),
        _VALUES,
        _VALUES.map(lambda v: "Bearer " + v),
        st.from_regex(r"\ABearer [A-Za-z0-9_-]{0,60}(\.[A-Za-z0-9_-]{0,60}){2}\Z"),  # JWT-shaped, unsigned
    )


def odd_tenants(tenant_id: str) -> st.SearchStrategy[str]:
    """x-tenant-id values that are not exactly the token's tenant."""
    return st.one_of(
        st.sampled_from(
            [
                "",
                "t_",
                "t_platform",
                tenant_id.upper(),
                tenant_id + " ",
                " " + tenant_id,
                tenant_id + ",",
                tenant_id[:-1],
                "*",
                "%",
                tenant_id + "," + tenant_id,
            ]
        ),
        _VALUES,
    ).filter(lambda v: v != tenant_id)
