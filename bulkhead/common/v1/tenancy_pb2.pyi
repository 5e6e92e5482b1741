from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_POOLED: _ClassVar[Tier]
    TIER_BRIDGE: _ClassVar[Tier]
    TIER_SILO: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_POOLED: Tier
TIER_BRIDGE: Tier
TIER_SILO: Tier
