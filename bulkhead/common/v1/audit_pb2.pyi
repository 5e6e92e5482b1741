import datetime

from bulkhead.common.v1 import auth_pb2 as _auth_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditActor(_message.Message):
    __slots__ = ("principal_id", "operator_id", "delegator_id", "agent_id")
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_ID_FIELD_NUMBER: _ClassVar[int]
    DELEGATOR_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    principal_id: str
    operator_id: str
    delegator_id: str
    agent_id: str
    def __init__(self, principal_id: _Optional[str] = ..., operator_id: _Optional[str] = ..., delegator_id: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("sequence", "prev_hash", "hash", "actor", "action", "target", "detail", "time", "request_id")
    class DetailEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    prev_hash: str
    hash: str
    actor: AuditActor
    action: str
    target: str
    detail: _containers.ScalarMap[str, str]
    time: _timestamp_pb2.Timestamp
    request_id: str
    def __init__(self, sequence: _Optional[int] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ..., actor: _Optional[_Union[AuditActor, _Mapping]] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., detail: _Optional[_Mapping[str, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ChainHead(_message.Message):
    __slots__ = ("sequence", "hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    hash: str
    def __init__(self, sequence: _Optional[int] = ..., hash: _Optional[str] = ...) -> None: ...

class ChainAnchor(_message.Message):
    __slots__ = ("sequence", "hash", "time")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    hash: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, sequence: _Optional[int] = ..., hash: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("tenant_id", "page_size", "page_token", "action", "target", "oldest_first")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OLDEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    page_size: int
    page_token: str
    action: str
    target: str
    oldest_first: bool
    def __init__(self, tenant_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., oldest_first: _Optional[bool] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("service", "events", "next_page_token", "head", "anchor")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    service: str
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    head: ChainHead
    anchor: ChainAnchor
    def __init__(self, service: _Optional[str] = ..., events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., head: _Optional[_Union[ChainHead, _Mapping]] = ..., anchor: _Optional[_Union[ChainAnchor, _Mapping]] = ...) -> None: ...

class VerifyAuditEventsRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class VerifyAuditEventsResponse(_message.Message):
    __slots__ = ("service", "intact", "events_checked", "first_bad_sequence", "problem", "head", "anchor")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INTACT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    service: str
    intact: bool
    events_checked: int
    first_bad_sequence: int
    problem: str
    head: ChainHead
    anchor: ChainAnchor
    def __init__(self, service: _Optional[str] = ..., intact: _Optional[bool] = ..., events_checked: _Optional[int] = ..., first_bad_sequence: _Optional[int] = ..., problem: _Optional[str] = ..., head: _Optional[_Union[ChainHead, _Mapping]] = ..., anchor: _Optional[_Union[ChainAnchor, _Mapping]] = ...) -> None: ...
