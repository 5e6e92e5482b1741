from bulkhead.common.v1 import auth_pb2 as _auth_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Seen(_message.Message):
    __slots__ = ("tenant_id", "principal_id", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    principal_id: str
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., principal_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("message", "fail_with")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAIL_WITH_FIELD_NUMBER: _ClassVar[int]
    message: str
    fail_with: str
    def __init__(self, message: _Optional[str] = ..., fail_with: _Optional[str] = ...) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("message", "seen")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    message: str
    seen: Seen
    def __init__(self, message: _Optional[str] = ..., seen: _Optional[_Union[Seen, _Mapping]] = ...) -> None: ...

class EchoStreamRequest(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class EchoStreamResponse(_message.Message):
    __slots__ = ("index", "seen")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    index: int
    seen: Seen
    def __init__(self, index: _Optional[int] = ..., seen: _Optional[_Union[Seen, _Mapping]] = ...) -> None: ...

class EchoCollectRequest(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class EchoCollectResponse(_message.Message):
    __slots__ = ("count", "seen")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    count: int
    seen: Seen
    def __init__(self, count: _Optional[int] = ..., seen: _Optional[_Union[Seen, _Mapping]] = ...) -> None: ...

class EchoChatRequest(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class EchoChatResponse(_message.Message):
    __slots__ = ("message", "seen")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    message: str
    seen: Seen
    def __init__(self, message: _Optional[str] = ..., seen: _Optional[_Union[Seen, _Mapping]] = ...) -> None: ...

class PublicEchoRequest(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class PublicEchoResponse(_message.Message):
    __slots__ = ("message", "tenant_bound")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TENANT_BOUND_FIELD_NUMBER: _ClassVar[int]
    message: str
    tenant_bound: bool
    def __init__(self, message: _Optional[str] = ..., tenant_bound: _Optional[bool] = ...) -> None: ...

class OperatorEchoRequest(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class OperatorEchoResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class UnguardedRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnguardedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
