import datetime

from bulkhead.common.v1 import audit_pb2 as _audit_pb2
from bulkhead.common.v1 import auth_pb2 as _auth_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecretVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECRET_VERSION_STATE_UNSPECIFIED: _ClassVar[SecretVersionState]
    SECRET_VERSION_STATE_CURRENT: _ClassVar[SecretVersionState]
    SECRET_VERSION_STATE_PREVIOUS: _ClassVar[SecretVersionState]
    SECRET_VERSION_STATE_DELETED: _ClassVar[SecretVersionState]
    SECRET_VERSION_STATE_DESTROYED: _ClassVar[SecretVersionState]

class AccessAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_ACTION_UNSPECIFIED: _ClassVar[AccessAction]
    ACCESS_ACTION_PUT: _ClassVar[AccessAction]
    ACCESS_ACTION_GET: _ClassVar[AccessAction]
    ACCESS_ACTION_DESCRIBE: _ClassVar[AccessAction]
    ACCESS_ACTION_ROTATE: _ClassVar[AccessAction]
    ACCESS_ACTION_DELETE: _ClassVar[AccessAction]
    ACCESS_ACTION_DESTROY: _ClassVar[AccessAction]
    ACCESS_ACTION_EXPIRE: _ClassVar[AccessAction]
    ACCESS_ACTION_ENCRYPT: _ClassVar[AccessAction]
    ACCESS_ACTION_DECRYPT: _ClassVar[AccessAction]
    ACCESS_ACTION_GENERATE_DATA_KEY: _ClassVar[AccessAction]
    ACCESS_ACTION_ROTATE_KEY: _ClassVar[AccessAction]
    ACCESS_ACTION_REWRAP: _ClassVar[AccessAction]
    ACCESS_ACTION_LIST: _ClassVar[AccessAction]

class AccessOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_OUTCOME_UNSPECIFIED: _ClassVar[AccessOutcome]
    ACCESS_OUTCOME_ALLOWED: _ClassVar[AccessOutcome]
    ACCESS_OUTCOME_DENIED: _ClassVar[AccessOutcome]
    ACCESS_OUTCOME_NOT_FOUND: _ClassVar[AccessOutcome]
    ACCESS_OUTCOME_CONFLICT: _ClassVar[AccessOutcome]
    ACCESS_OUTCOME_INVALID: _ClassVar[AccessOutcome]
    ACCESS_OUTCOME_FAILED: _ClassVar[AccessOutcome]
SECRET_VERSION_STATE_UNSPECIFIED: SecretVersionState
SECRET_VERSION_STATE_CURRENT: SecretVersionState
SECRET_VERSION_STATE_PREVIOUS: SecretVersionState
SECRET_VERSION_STATE_DELETED: SecretVersionState
SECRET_VERSION_STATE_DESTROYED: SecretVersionState
ACCESS_ACTION_UNSPECIFIED: AccessAction
ACCESS_ACTION_PUT: AccessAction
ACCESS_ACTION_GET: AccessAction
ACCESS_ACTION_DESCRIBE: AccessAction
ACCESS_ACTION_ROTATE: AccessAction
ACCESS_ACTION_DELETE: AccessAction
ACCESS_ACTION_DESTROY: AccessAction
ACCESS_ACTION_EXPIRE: AccessAction
ACCESS_ACTION_ENCRYPT: AccessAction
ACCESS_ACTION_DECRYPT: AccessAction
ACCESS_ACTION_GENERATE_DATA_KEY: AccessAction
ACCESS_ACTION_ROTATE_KEY: AccessAction
ACCESS_ACTION_REWRAP: AccessAction
ACCESS_ACTION_LIST: AccessAction
ACCESS_OUTCOME_UNSPECIFIED: AccessOutcome
ACCESS_OUTCOME_ALLOWED: AccessOutcome
ACCESS_OUTCOME_DENIED: AccessOutcome
ACCESS_OUTCOME_NOT_FOUND: AccessOutcome
ACCESS_OUTCOME_CONFLICT: AccessOutcome
ACCESS_OUTCOME_INVALID: AccessOutcome
ACCESS_OUTCOME_FAILED: AccessOutcome

class SecretVersion(_message.Message):
    __slots__ = ("version", "state", "create_time", "expire_time", "created_by", "origin")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: SecretVersionState
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    created_by: str
    origin: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[SecretVersionState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., origin: _Optional[str] = ...) -> None: ...

class Secret(_message.Message):
    __slots__ = ("name", "description", "current_version", "rotation_period", "rotator", "next_rotation_time", "grace_period", "create_time", "update_time", "last_access_time", "delete_time", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_FIELD_NUMBER: _ClassVar[int]
    ROTATOR_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROTATION_TIME_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCESS_TIME_FIELD_NUMBER: _ClassVar[int]
    DELETE_TIME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    current_version: int
    rotation_period: _duration_pb2.Duration
    rotator: str
    next_rotation_time: _timestamp_pb2.Timestamp
    grace_period: _duration_pb2.Duration
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    last_access_time: _timestamp_pb2.Timestamp
    delete_time: _timestamp_pb2.Timestamp
    versions: _containers.RepeatedCompositeFieldContainer[SecretVersion]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., current_version: _Optional[int] = ..., rotation_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., rotator: _Optional[str] = ..., next_rotation_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., grace_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_access_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., delete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[SecretVersion, _Mapping]]] = ...) -> None: ...

class PutSecretRequest(_message.Message):
    __slots__ = ("name", "value", "cas", "description", "rotation_period", "rotator", "grace_period")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CAS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_FIELD_NUMBER: _ClassVar[int]
    ROTATOR_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: bytes
    cas: int
    description: str
    rotation_period: _duration_pb2.Duration
    rotator: str
    grace_period: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., value: _Optional[bytes] = ..., cas: _Optional[int] = ..., description: _Optional[str] = ..., rotation_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., rotator: _Optional[str] = ..., grace_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class PutSecretResponse(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: Secret
    def __init__(self, secret: _Optional[_Union[Secret, _Mapping]] = ...) -> None: ...

class GetSecretRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetSecretResponse(_message.Message):
    __slots__ = ("name", "version", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    value: bytes
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...

class ListSecretsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "show_deleted")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHOW_DELETED_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    show_deleted: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., show_deleted: _Optional[bool] = ...) -> None: ...

class ListSecretsResponse(_message.Message):
    __slots__ = ("secrets", "next_page_token")
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    secrets: _containers.RepeatedCompositeFieldContainer[Secret]
    next_page_token: str
    def __init__(self, secrets: _Optional[_Iterable[_Union[Secret, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DescribeSecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DescribeSecretResponse(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: Secret
    def __init__(self, secret: _Optional[_Union[Secret, _Mapping]] = ...) -> None: ...

class RotateSecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RotateSecretResponse(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: Secret
    def __init__(self, secret: _Optional[_Union[Secret, _Mapping]] = ...) -> None: ...

class DeleteSecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSecretResponse(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: Secret
    def __init__(self, secret: _Optional[_Union[Secret, _Mapping]] = ...) -> None: ...

class DestroySecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DestroySecretResponse(_message.Message):
    __slots__ = ("destroyed_versions",)
    DESTROYED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    destroyed_versions: int
    def __init__(self, destroyed_versions: _Optional[int] = ...) -> None: ...

class AccessEvent(_message.Message):
    __slots__ = ("sequence", "time", "principal_id", "actor_id", "agent_id", "run_id", "request_id", "secret_name", "version", "action", "outcome", "reason", "hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    principal_id: str
    actor_id: str
    agent_id: str
    run_id: str
    request_id: str
    secret_name: str
    version: int
    action: AccessAction
    outcome: AccessOutcome
    reason: str
    hash: str
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal_id: _Optional[str] = ..., actor_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., secret_name: _Optional[str] = ..., version: _Optional[int] = ..., action: _Optional[_Union[AccessAction, str]] = ..., outcome: _Optional[_Union[AccessOutcome, str]] = ..., reason: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class ListAccessEventsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "secret_name")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_NAME_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    secret_name: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., secret_name: _Optional[str] = ...) -> None: ...

class ListAccessEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token", "anchor")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AccessEvent]
    next_page_token: str
    anchor: _audit_pb2.ChainAnchor
    def __init__(self, events: _Optional[_Iterable[_Union[AccessEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., anchor: _Optional[_Union[_audit_pb2.ChainAnchor, _Mapping]] = ...) -> None: ...

class VerifyAccessEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyAccessEventsResponse(_message.Message):
    __slots__ = ("intact", "events_checked", "first_bad_sequence", "problem", "anchor")
    INTACT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    intact: bool
    events_checked: int
    first_bad_sequence: int
    problem: str
    anchor: _audit_pb2.ChainAnchor
    def __init__(self, intact: _Optional[bool] = ..., events_checked: _Optional[int] = ..., first_bad_sequence: _Optional[int] = ..., problem: _Optional[str] = ..., anchor: _Optional[_Union[_audit_pb2.ChainAnchor, _Mapping]] = ...) -> None: ...

class EncryptRequest(_message.Message):
    __slots__ = ("plaintext",)
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    plaintext: bytes
    def __init__(self, plaintext: _Optional[bytes] = ...) -> None: ...

class EncryptResponse(_message.Message):
    __slots__ = ("ciphertext", "key_version")
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    key_version: int
    def __init__(self, ciphertext: _Optional[bytes] = ..., key_version: _Optional[int] = ...) -> None: ...

class DecryptRequest(_message.Message):
    __slots__ = ("ciphertext",)
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    def __init__(self, ciphertext: _Optional[bytes] = ...) -> None: ...

class DecryptResponse(_message.Message):
    __slots__ = ("plaintext",)
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    plaintext: bytes
    def __init__(self, plaintext: _Optional[bytes] = ...) -> None: ...

class GenerateDataKeyRequest(_message.Message):
    __slots__ = ("bits",)
    BITS_FIELD_NUMBER: _ClassVar[int]
    bits: int
    def __init__(self, bits: _Optional[int] = ...) -> None: ...

class GenerateDataKeyResponse(_message.Message):
    __slots__ = ("plaintext_key", "wrapped_key", "key_version")
    PLAINTEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    plaintext_key: bytes
    wrapped_key: bytes
    key_version: int
    def __init__(self, plaintext_key: _Optional[bytes] = ..., wrapped_key: _Optional[bytes] = ..., key_version: _Optional[int] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("key_version",)
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    key_version: int
    def __init__(self, key_version: _Optional[int] = ...) -> None: ...

class RewrapRequest(_message.Message):
    __slots__ = ("ciphertext",)
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    def __init__(self, ciphertext: _Optional[bytes] = ...) -> None: ...

class RewrapResponse(_message.Message):
    __slots__ = ("ciphertext", "key_version")
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    key_version: int
    def __init__(self, ciphertext: _Optional[bytes] = ..., key_version: _Optional[int] = ...) -> None: ...
