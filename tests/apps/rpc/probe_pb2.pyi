from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Nap(_message.Message):
    __slots__ = ("seconds", "count")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    count: int
    def __init__(self, seconds: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class Blob(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Seen(_message.Message):
    __slots__ = ("trace_id", "uid", "user_ip", "request_id", "count", "deadline_s")
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    USER_IP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    trace_id: str
    uid: str
    user_ip: str
    request_id: str
    count: int
    deadline_s: float
    def __init__(self, trace_id: _Optional[str] = ..., uid: _Optional[str] = ..., user_ip: _Optional[str] = ..., request_id: _Optional[str] = ..., count: _Optional[int] = ..., deadline_s: _Optional[float] = ...) -> None: ...
