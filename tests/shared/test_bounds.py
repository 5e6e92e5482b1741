"""shared.bounds: the edge check every interceptor runs finds a bad number in every shape a field can take.

The check has a fast path (no field paths built) for the common clean request; these tests put one bad
value in each shape (a number, repeated numbers, a map to numbers, a message, repeated messages, a map to
messages, a JSON number deep in a Struct) and require the path of exactly that value.
"""

from __future__ import annotations

import math

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from shared.bounds import MAX_SAFE_INTEGER, number_violations

_TOO_BIG = MAX_SAFE_INTEGER + 1


def _probe_class():
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(struct_pb2.DESCRIPTOR.serialized_pb))
    f = descriptor_pb2.FileDescriptorProto(
        name="bounds_probe.proto", package="probe", syntax="proto3", dependency=["google/protobuf/struct.proto"]
    )
    probe = f.message_type.add(name="Probe")
    T = L = descriptor_pb2.FieldDescriptorProto
    entries = {
        "CountsEntry": (T.TYPE_INT64, None),
        "NamedEntry": (T.TYPE_MESSAGE, ".probe.Probe"),
    }
    for entry, (value_type, value_name) in entries.items():
        e = probe.nested_type.add(name=entry)
        e.options.map_entry = True
        e.field.add(name="key", number=1, type=T.TYPE_STRING, label=L.LABEL_OPTIONAL)
        value = e.field.add(name="value", number=2, type=value_type, label=L.LABEL_OPTIONAL)
        if value_name:
            value.type_name = value_name
    fields = [
        ("one", 1, T.TYPE_INT64, None, L.LABEL_OPTIONAL),
        ("many", 2, T.TYPE_INT64, None, L.LABEL_REPEATED),
        ("counts", 3, T.TYPE_MESSAGE, ".probe.Probe.CountsEntry", L.LABEL_REPEATED),
        ("child", 4, T.TYPE_MESSAGE, ".probe.Probe", L.LABEL_OPTIONAL),
        ("children", 5, T.TYPE_MESSAGE, ".probe.Probe", L.LABEL_REPEATED),
        ("named", 6, T.TYPE_MESSAGE, ".probe.Probe.NamedEntry", L.LABEL_REPEATED),
        ("json", 7, T.TYPE_MESSAGE, ".google.protobuf.Struct", L.LABEL_OPTIONAL),
        ("small", 8, T.TYPE_INT32, None, L.LABEL_OPTIONAL),  # 32-bit: never checked
    ]
    for name, number, kind, type_name, label in fields:
        field = probe.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("probe.Probe"))


Probe = _probe_class()


def _clean_probe():
    p = Probe(one=MAX_SAFE_INTEGER, many=[1, -MAX_SAFE_INTEGER], small=2**31 - 1)
    p.counts["a"] = 5
    p.child.one = 7
    p.children.add(one=-MAX_SAFE_INTEGER)
    p.children.add().counts["b"] = 9
    p.named["n"].many.extend([1, 2])
    p.json.update({"x": 1.5, "deep": {"list": [1, 2.5, {"y": -3}]}})
    return p


SPOILERS = {
    "one": lambda p: setattr(p, "one", _TOO_BIG),
    "many[1]": lambda p: p.many.__setitem__(1, -_TOO_BIG),
    "counts[a]": lambda p: p.counts.__setitem__("a", _TOO_BIG),
    "child.one": lambda p: setattr(p.child, "one", _TOO_BIG),
    "children[1].counts[b]": lambda p: p.children[1].counts.__setitem__("b", -_TOO_BIG),
    "named[n].many[0]": lambda p: p.named["n"].many.__setitem__(0, _TOO_BIG),
    "json.fields[deep].struct_value.fields[list].list_value.values[2].struct_value.fields[y].number_value": (
        lambda p: p.json["deep"]["list"][2].update({"y": math.inf})
    ),
}


def test_a_clean_message_of_every_shape_has_no_violation():
    assert number_violations(_clean_probe()) == {}


@pytest.mark.parametrize("path", SPOILERS)
def test_one_bad_number_in_any_shape_is_found_at_its_path(path):
    probe = _clean_probe()
    SPOILERS[path](probe)
    assert list(number_violations(probe)) == [path]


def test_every_bad_number_is_listed_not_just_the_first():
    probe = _clean_probe()
    for spoil in SPOILERS.values():
        spoil(probe)
    assert sorted(number_violations(probe)) == sorted(SPOILERS)


def test_nan_is_refused_and_32_bit_fields_are_not_checked():
    probe = _clean_probe()
    probe.json["x"] = math.nan
    probe.small = -(2**31)
    assert list(number_violations(probe)) == ["json.fields[x].number_value"]
