from bulkhead.common.v1 import auth_pb2 as _auth_pb2
from bulkhead.common.v1 import tenancy_pb2 as _tenancy_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TableInventory(_message.Message):
    __slots__ = ("store", "table", "rows", "checksum")
    STORE_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    store: str
    table: str
    rows: int
    checksum: str
    def __init__(self, store: _Optional[str] = ..., table: _Optional[str] = ..., rows: _Optional[int] = ..., checksum: _Optional[str] = ...) -> None: ...

class DestroyedKey(_message.Message):
    __slots__ = ("key_id", "backend")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    backend: str
    def __init__(self, key_id: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class KeptData(_message.Message):
    __slots__ = ("store", "table", "rows", "reason")
    STORE_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    store: str
    table: str
    rows: int
    reason: str
    def __init__(self, store: _Optional[str] = ..., table: _Optional[str] = ..., rows: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class PurgeAction(_message.Message):
    __slots__ = ("name", "count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class InventoryTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "tier")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ...) -> None: ...

class InventoryTenantResponse(_message.Message):
    __slots__ = ("service", "tables")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    service: str
    tables: _containers.RepeatedCompositeFieldContainer[TableInventory]
    def __init__(self, service: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableInventory, _Mapping]]] = ...) -> None: ...

class PurgeTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "tier")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ...) -> None: ...

class PurgeTenantResponse(_message.Message):
    __slots__ = ("service", "destroyed_keys", "deleted", "dropped_stores", "kept", "actions")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DESTROYED_KEYS_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STORES_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    service: str
    destroyed_keys: _containers.RepeatedCompositeFieldContainer[DestroyedKey]
    deleted: _containers.RepeatedCompositeFieldContainer[TableInventory]
    dropped_stores: _containers.RepeatedScalarFieldContainer[str]
    kept: _containers.RepeatedCompositeFieldContainer[KeptData]
    actions: _containers.RepeatedCompositeFieldContainer[PurgeAction]
    def __init__(self, service: _Optional[str] = ..., destroyed_keys: _Optional[_Iterable[_Union[DestroyedKey, _Mapping]]] = ..., deleted: _Optional[_Iterable[_Union[TableInventory, _Mapping]]] = ..., dropped_stores: _Optional[_Iterable[str]] = ..., kept: _Optional[_Iterable[_Union[KeptData, _Mapping]]] = ..., actions: _Optional[_Iterable[_Union[PurgeAction, _Mapping]]] = ...) -> None: ...

class CopyTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "tier", "target_tier", "pause_seconds", "region", "target_region")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TARGET_TIER_FIELD_NUMBER: _ClassVar[int]
    PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    TARGET_REGION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    target_tier: _tenancy_pb2.Tier
    pause_seconds: int
    region: str
    target_region: str
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., target_tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., pause_seconds: _Optional[int] = ..., region: _Optional[str] = ..., target_region: _Optional[str] = ...) -> None: ...

class CopyTenantResponse(_message.Message):
    __slots__ = ("service", "copied", "paused_seconds")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    COPIED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    service: str
    copied: _containers.RepeatedCompositeFieldContainer[TableInventory]
    paused_seconds: float
    def __init__(self, service: _Optional[str] = ..., copied: _Optional[_Iterable[_Union[TableInventory, _Mapping]]] = ..., paused_seconds: _Optional[float] = ...) -> None: ...

class VerifyTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "tier", "target_tier", "region", "target_region")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TARGET_TIER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    TARGET_REGION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    target_tier: _tenancy_pb2.Tier
    region: str
    target_region: str
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., target_tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., region: _Optional[str] = ..., target_region: _Optional[str] = ...) -> None: ...

class VerifyTenantResponse(_message.Message):
    __slots__ = ("service", "source", "target", "equal", "mismatched_tables")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    EQUAL_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_TABLES_FIELD_NUMBER: _ClassVar[int]
    service: str
    source: _containers.RepeatedCompositeFieldContainer[TableInventory]
    target: _containers.RepeatedCompositeFieldContainer[TableInventory]
    equal: bool
    mismatched_tables: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, service: _Optional[str] = ..., source: _Optional[_Iterable[_Union[TableInventory, _Mapping]]] = ..., target: _Optional[_Iterable[_Union[TableInventory, _Mapping]]] = ..., equal: _Optional[bool] = ..., mismatched_tables: _Optional[_Iterable[str]] = ...) -> None: ...

class SwitchTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "tier", "region")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    region: str
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., region: _Optional[str] = ...) -> None: ...

class SwitchTenantResponse(_message.Message):
    __slots__ = ("service", "tier")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    service: str
    tier: _tenancy_pb2.Tier
    def __init__(self, service: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ...) -> None: ...

class ReleaseTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "tier", "current_tier", "region", "current_region")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TIER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_REGION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    current_tier: _tenancy_pb2.Tier
    region: str
    current_region: str
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., current_tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., region: _Optional[str] = ..., current_region: _Optional[str] = ...) -> None: ...

class ReleaseTenantResponse(_message.Message):
    __slots__ = ("service", "deleted")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    service: str
    deleted: _containers.RepeatedCompositeFieldContainer[TableInventory]
    def __init__(self, service: _Optional[str] = ..., deleted: _Optional[_Iterable[_Union[TableInventory, _Mapping]]] = ...) -> None: ...
