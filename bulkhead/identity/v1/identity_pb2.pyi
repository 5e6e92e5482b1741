import datetime

from bulkhead.common.v1 import auth_pb2 as _auth_pb2
from bulkhead.common.v1 import tenancy_pb2 as _tenancy_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TenantStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENANT_STATUS_UNSPECIFIED: _ClassVar[TenantStatus]
    TENANT_STATUS_ACTIVE: _ClassVar[TenantStatus]
    TENANT_STATUS_SUSPENDED: _ClassVar[TenantStatus]
    TENANT_STATUS_DELETING: _ClassVar[TenantStatus]
    TENANT_STATUS_DELETED: _ClassVar[TenantStatus]

class DeletionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELETION_STATE_UNSPECIFIED: _ClassVar[DeletionState]
    DELETION_STATE_SCHEDULED: _ClassVar[DeletionState]
    DELETION_STATE_RUNNING: _ClassVar[DeletionState]
    DELETION_STATE_DONE: _ClassVar[DeletionState]

class PrincipalKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRINCIPAL_KIND_UNSPECIFIED: _ClassVar[PrincipalKind]
    PRINCIPAL_KIND_USER: _ClassVar[PrincipalKind]
    PRINCIPAL_KIND_SERVICE_ACCOUNT: _ClassVar[PrincipalKind]
    PRINCIPAL_KIND_AGENT: _ClassVar[PrincipalKind]

class MigrationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_STATE_UNSPECIFIED: _ClassVar[MigrationState]
    MIGRATION_STATE_COPYING: _ClassVar[MigrationState]
    MIGRATION_STATE_RELEASING: _ClassVar[MigrationState]
    MIGRATION_STATE_DONE: _ClassVar[MigrationState]
    MIGRATION_STATE_ABORTING: _ClassVar[MigrationState]
    MIGRATION_STATE_ABORTED: _ClassVar[MigrationState]
TENANT_STATUS_UNSPECIFIED: TenantStatus
TENANT_STATUS_ACTIVE: TenantStatus
TENANT_STATUS_SUSPENDED: TenantStatus
TENANT_STATUS_DELETING: TenantStatus
TENANT_STATUS_DELETED: TenantStatus
DELETION_STATE_UNSPECIFIED: DeletionState
DELETION_STATE_SCHEDULED: DeletionState
DELETION_STATE_RUNNING: DeletionState
DELETION_STATE_DONE: DeletionState
PRINCIPAL_KIND_UNSPECIFIED: PrincipalKind
PRINCIPAL_KIND_USER: PrincipalKind
PRINCIPAL_KIND_SERVICE_ACCOUNT: PrincipalKind
PRINCIPAL_KIND_AGENT: PrincipalKind
MIGRATION_STATE_UNSPECIFIED: MigrationState
MIGRATION_STATE_COPYING: MigrationState
MIGRATION_STATE_RELEASING: MigrationState
MIGRATION_STATE_DONE: MigrationState
MIGRATION_STATE_ABORTING: MigrationState
MIGRATION_STATE_ABORTED: MigrationState

class DeletionStep(_message.Message):
    __slots__ = ("service", "done", "attempts", "last_error")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    service: str
    done: bool
    attempts: int
    last_error: str
    def __init__(self, service: _Optional[str] = ..., done: _Optional[bool] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class TenantDeletion(_message.Message):
    __slots__ = ("tenant_id", "state", "delete_after_time", "request_time", "complete_time", "steps")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DELETE_AFTER_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    state: DeletionState
    delete_after_time: _timestamp_pb2.Timestamp
    request_time: _timestamp_pb2.Timestamp
    complete_time: _timestamp_pb2.Timestamp
    steps: _containers.RepeatedCompositeFieldContainer[DeletionStep]
    def __init__(self, tenant_id: _Optional[str] = ..., state: _Optional[_Union[DeletionState, str]] = ..., delete_after_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[DeletionStep, _Mapping]]] = ...) -> None: ...

class DeletionReceipt(_message.Message):
    __slots__ = ("body", "signature", "kid", "public_key")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    kid: str
    public_key: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., kid: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("id", "name", "tier", "region", "status", "create_time", "retention")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    tier: _tenancy_pb2.Tier
    region: str
    status: TenantStatus
    create_time: _timestamp_pb2.Timestamp
    retention: RetentionPolicy
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., region: _Optional[str] = ..., status: _Optional[_Union[TenantStatus, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retention: _Optional[_Union[RetentionPolicy, _Mapping]] = ...) -> None: ...

class Principal(_message.Message):
    __slots__ = ("id", "kind", "display_name", "scopes", "disabled", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: PrincipalKind
    display_name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    disabled: bool
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[PrincipalKind, str]] = ..., display_name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., disabled: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "principal_id", "prefix", "scopes", "display_name", "revoke_time", "create_time", "last_used_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    principal_id: str
    prefix: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    display_name: str
    revoke_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    last_used_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., principal_id: _Optional[str] = ..., prefix: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., display_name: _Optional[str] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SigningKey(_message.Message):
    __slots__ = ("kid", "algorithm", "public_key", "active", "create_time", "retire_time")
    KID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RETIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    kid: str
    algorithm: str
    public_key: bytes
    active: bool
    create_time: _timestamp_pb2.Timestamp
    retire_time: _timestamp_pb2.Timestamp
    def __init__(self, kid: _Optional[str] = ..., algorithm: _Optional[str] = ..., public_key: _Optional[bytes] = ..., active: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RevokedToken(_message.Message):
    __slots__ = ("jti", "expire_time")
    JTI_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    jti: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, jti: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("name", "tier", "region")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: _tenancy_pb2.Tier
    region: str
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., region: _Optional[str] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ("tenant", "admin", "admin_api_key")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    ADMIN_API_KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    admin: Principal
    admin_api_key: str
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., admin: _Optional[_Union[Principal, _Mapping]] = ..., admin_api_key: _Optional[str] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetTenantResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "next_page_token")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    next_page_token: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateTenantStatusRequest(_message.Message):
    __slots__ = ("tenant_id", "status")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    status: TenantStatus
    def __init__(self, tenant_id: _Optional[str] = ..., status: _Optional[_Union[TenantStatus, str]] = ...) -> None: ...

class UpdateTenantStatusResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class CreatePrincipalRequest(_message.Message):
    __slots__ = ("kind", "display_name", "scopes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    kind: PrincipalKind
    display_name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[_Union[PrincipalKind, str]] = ..., display_name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class CreatePrincipalResponse(_message.Message):
    __slots__ = ("principal",)
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ...) -> None: ...

class GetPrincipalRequest(_message.Message):
    __slots__ = ("principal_id",)
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    principal_id: str
    def __init__(self, principal_id: _Optional[str] = ...) -> None: ...

class GetPrincipalResponse(_message.Message):
    __slots__ = ("principal",)
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ...) -> None: ...

class ListPrincipalsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPrincipalsResponse(_message.Message):
    __slots__ = ("principals", "next_page_token")
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    principals: _containers.RepeatedCompositeFieldContainer[Principal]
    next_page_token: str
    def __init__(self, principals: _Optional[_Iterable[_Union[Principal, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DisablePrincipalRequest(_message.Message):
    __slots__ = ("principal_id",)
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    principal_id: str
    def __init__(self, principal_id: _Optional[str] = ...) -> None: ...

class DisablePrincipalResponse(_message.Message):
    __slots__ = ("principal",)
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: Principal
    def __init__(self, principal: _Optional[_Union[Principal, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("principal_id", "scopes", "display_name")
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    principal_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    display_name: str
    def __init__(self, principal_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., display_name: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "secret")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    secret: str
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("principal_id", "page_size", "page_token")
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    principal_id: str
    page_size: int
    page_token: str
    def __init__(self, principal_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("api_keys", "next_page_token")
    API_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    api_keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, api_keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("api_key_id",)
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    api_key_id: str
    def __init__(self, api_key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class IssueTokenRequest(_message.Message):
    __slots__ = ("api_key", "scopes", "ttl_seconds")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    def __init__(self, api_key: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("token", "tenant_id", "expire_time", "scopes", "jti")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    token: str
    tenant_id: str
    expire_time: _timestamp_pb2.Timestamp
    scopes: _containers.RepeatedScalarFieldContainer[str]
    jti: str
    def __init__(self, token: _Optional[str] = ..., tenant_id: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scopes: _Optional[_Iterable[str]] = ..., jti: _Optional[str] = ...) -> None: ...

class ExchangeTokenRequest(_message.Message):
    __slots__ = ("scopes", "agent_id", "run_id", "ttl_seconds")
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    agent_id: str
    run_id: str
    ttl_seconds: int
    def __init__(self, scopes: _Optional[_Iterable[str]] = ..., agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class ExchangeTokenResponse(_message.Message):
    __slots__ = ("token", "expire_time", "scopes", "jti")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    token: str
    expire_time: _timestamp_pb2.Timestamp
    scopes: _containers.RepeatedScalarFieldContainer[str]
    jti: str
    def __init__(self, token: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scopes: _Optional[_Iterable[str]] = ..., jti: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("jti",)
    JTI_FIELD_NUMBER: _ClassVar[int]
    jti: str
    def __init__(self, jti: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: RevokedToken
    def __init__(self, revoked: _Optional[_Union[RevokedToken, _Mapping]] = ...) -> None: ...

class ListRevokedTokensRequest(_message.Message):
    __slots__ = ("since_revision",)
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    def __init__(self, since_revision: _Optional[int] = ...) -> None: ...

class ListRevokedTokensResponse(_message.Message):
    __slots__ = ("revoked", "revision", "suspended_tenant_ids", "migrating_tenant_ids", "placements")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_TENANT_IDS_FIELD_NUMBER: _ClassVar[int]
    MIGRATING_TENANT_IDS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedCompositeFieldContainer[RevokedToken]
    revision: int
    suspended_tenant_ids: _containers.RepeatedScalarFieldContainer[str]
    migrating_tenant_ids: _containers.RepeatedScalarFieldContainer[str]
    placements: _containers.RepeatedCompositeFieldContainer[TenantTierPlacement]
    def __init__(self, revoked: _Optional[_Iterable[_Union[RevokedToken, _Mapping]]] = ..., revision: _Optional[int] = ..., suspended_tenant_ids: _Optional[_Iterable[str]] = ..., migrating_tenant_ids: _Optional[_Iterable[str]] = ..., placements: _Optional[_Iterable[_Union[TenantTierPlacement, _Mapping]]] = ...) -> None: ...

class TenantTierPlacement(_message.Message):
    __slots__ = ("tenant_id", "tier", "generation", "region")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    generation: int
    region: str
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., generation: _Optional[int] = ..., region: _Optional[str] = ...) -> None: ...

class GetTenantPlacementRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetTenantPlacementResponse(_message.Message):
    __slots__ = ("tenant_id", "tier", "region")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    region: str
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., region: _Optional[str] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "grace_seconds", "now")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOW_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    grace_seconds: int
    now: bool
    def __init__(self, tenant_id: _Optional[str] = ..., grace_seconds: _Optional[int] = ..., now: _Optional[bool] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ("deletion",)
    DELETION_FIELD_NUMBER: _ClassVar[int]
    deletion: TenantDeletion
    def __init__(self, deletion: _Optional[_Union[TenantDeletion, _Mapping]] = ...) -> None: ...

class GetDeletionReceiptRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetDeletionReceiptResponse(_message.Message):
    __slots__ = ("deletion", "receipt")
    DELETION_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    deletion: TenantDeletion
    receipt: DeletionReceipt
    def __init__(self, deletion: _Optional[_Union[TenantDeletion, _Mapping]] = ..., receipt: _Optional[_Union[DeletionReceipt, _Mapping]] = ...) -> None: ...

class ListSigningKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSigningKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[SigningKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[SigningKey, _Mapping]]] = ...) -> None: ...

class RotateSigningKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateSigningKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: SigningKey
    def __init__(self, key: _Optional[_Union[SigningKey, _Mapping]] = ...) -> None: ...

class RetentionPolicy(_message.Message):
    __slots__ = ("audit_days", "usage_detail_days", "audit_days_default", "usage_detail_days_default")
    AUDIT_DAYS_FIELD_NUMBER: _ClassVar[int]
    USAGE_DETAIL_DAYS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_DAYS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    USAGE_DETAIL_DAYS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    audit_days: int
    usage_detail_days: int
    audit_days_default: bool
    usage_detail_days_default: bool
    def __init__(self, audit_days: _Optional[int] = ..., usage_detail_days: _Optional[int] = ..., audit_days_default: _Optional[bool] = ..., usage_detail_days_default: _Optional[bool] = ...) -> None: ...

class SetRetentionPolicyRequest(_message.Message):
    __slots__ = ("tenant_id", "audit_days", "usage_detail_days")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIT_DAYS_FIELD_NUMBER: _ClassVar[int]
    USAGE_DETAIL_DAYS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    audit_days: int
    usage_detail_days: int
    def __init__(self, tenant_id: _Optional[str] = ..., audit_days: _Optional[int] = ..., usage_detail_days: _Optional[int] = ...) -> None: ...

class SetRetentionPolicyResponse(_message.Message):
    __slots__ = ("tenant_id", "retention")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    retention: RetentionPolicy
    def __init__(self, tenant_id: _Optional[str] = ..., retention: _Optional[_Union[RetentionPolicy, _Mapping]] = ...) -> None: ...

class GetRetentionPolicyRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetRetentionPolicyResponse(_message.Message):
    __slots__ = ("tenant_id", "retention")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    retention: RetentionPolicy
    def __init__(self, tenant_id: _Optional[str] = ..., retention: _Optional[_Union[RetentionPolicy, _Mapping]] = ...) -> None: ...

class ListRetentionPoliciesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class TenantRetention(_message.Message):
    __slots__ = ("tenant_id", "tier", "retention")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    retention: RetentionPolicy
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., retention: _Optional[_Union[RetentionPolicy, _Mapping]] = ...) -> None: ...

class ListRetentionPoliciesResponse(_message.Message):
    __slots__ = ("tenants", "next_page_token")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantRetention]
    next_page_token: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[TenantRetention, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TableProgress(_message.Message):
    __slots__ = ("table", "rows", "equal")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    EQUAL_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows: int
    equal: bool
    def __init__(self, table: _Optional[str] = ..., rows: _Optional[int] = ..., equal: _Optional[bool] = ...) -> None: ...

class MigrationStep(_message.Message):
    __slots__ = ("service", "phase", "attempts", "last_error", "tables")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    service: str
    phase: str
    attempts: int
    last_error: str
    tables: _containers.RepeatedCompositeFieldContainer[TableProgress]
    def __init__(self, service: _Optional[str] = ..., phase: _Optional[str] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableProgress, _Mapping]]] = ...) -> None: ...

class TenantMigration(_message.Message):
    __slots__ = ("tenant_id", "source_tier", "target_tier", "state", "generation", "pause_ms", "request_time", "complete_time", "last_error", "steps", "source_region", "target_region")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TIER_FIELD_NUMBER: _ClassVar[int]
    TARGET_TIER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REGION_FIELD_NUMBER: _ClassVar[int]
    TARGET_REGION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    source_tier: _tenancy_pb2.Tier
    target_tier: _tenancy_pb2.Tier
    state: MigrationState
    generation: int
    pause_ms: int
    request_time: _timestamp_pb2.Timestamp
    complete_time: _timestamp_pb2.Timestamp
    last_error: str
    steps: _containers.RepeatedCompositeFieldContainer[MigrationStep]
    source_region: str
    target_region: str
    def __init__(self, tenant_id: _Optional[str] = ..., source_tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., target_tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., state: _Optional[_Union[MigrationState, str]] = ..., generation: _Optional[int] = ..., pause_ms: _Optional[int] = ..., request_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[MigrationStep, _Mapping]]] = ..., source_region: _Optional[str] = ..., target_region: _Optional[str] = ...) -> None: ...

class MigrateTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "target_tier", "abort", "target_region")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_TIER_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_REGION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    target_tier: _tenancy_pb2.Tier
    abort: bool
    target_region: str
    def __init__(self, tenant_id: _Optional[str] = ..., target_tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., abort: _Optional[bool] = ..., target_region: _Optional[str] = ...) -> None: ...

class MigrateTenantResponse(_message.Message):
    __slots__ = ("migration",)
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    migration: TenantMigration
    def __init__(self, migration: _Optional[_Union[TenantMigration, _Mapping]] = ...) -> None: ...

class GetMigrationRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetMigrationResponse(_message.Message):
    __slots__ = ("migration",)
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    migration: TenantMigration
    def __init__(self, migration: _Optional[_Union[TenantMigration, _Mapping]] = ...) -> None: ...
