from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODE_OK: _ClassVar[Code]
    CODE_INVALID_ARGUMENT: _ClassVar[Code]
    CODE_UNAUTHENTICATED: _ClassVar[Code]
    CODE_PERMISSION_DENIED: _ClassVar[Code]
    CODE_QUEUE_NOT_FOUND: _ClassVar[Code]
    CODE_QUEUE_ALREADY_EXISTS: _ClassVar[Code]
    CODE_QUEUE_EMPTY: _ClassVar[Code]
    CODE_QUEUE_NOT_EMPTY: _ClassVar[Code]
    CODE_MESSAGE_NOT_FOUND: _ClassVar[Code]
    CODE_MAP_NOT_FOUND: _ClassVar[Code]
    CODE_KEY_NOT_FOUND: _ClassVar[Code]
    CODE_RESOURCE_EXHAUSTED: _ClassVar[Code]
    CODE_UNAVAILABLE: _ClassVar[Code]
    CODE_INTERNAL: _ClassVar[Code]
    CODE_LEASE_EXPIRED: _ClassVar[Code]
    CODE_SESSION_NOT_FOUND: _ClassVar[Code]

class AckType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_TYPE_DONE: _ClassVar[AckType]
    ACK_TYPE_ERROR: _ClassVar[AckType]
CODE_OK: Code
CODE_INVALID_ARGUMENT: Code
CODE_UNAUTHENTICATED: Code
CODE_PERMISSION_DENIED: Code
CODE_QUEUE_NOT_FOUND: Code
CODE_QUEUE_ALREADY_EXISTS: Code
CODE_QUEUE_EMPTY: Code
CODE_QUEUE_NOT_EMPTY: Code
CODE_MESSAGE_NOT_FOUND: Code
CODE_MAP_NOT_FOUND: Code
CODE_KEY_NOT_FOUND: Code
CODE_RESOURCE_EXHAUSTED: Code
CODE_UNAVAILABLE: Code
CODE_INTERNAL: Code
CODE_LEASE_EXPIRED: Code
CODE_SESSION_NOT_FOUND: Code
ACK_TYPE_DONE: AckType
ACK_TYPE_ERROR: AckType

class PasswordEnvelope(_message.Message):
    __slots__ = ("password", "challenge")
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    password: str
    challenge: bytes
    def __init__(self, password: _Optional[str] = ..., challenge: _Optional[bytes] = ...) -> None: ...

class ElementInfo(_message.Message):
    __slots__ = ("element", "message_id", "delivery_count", "enqueued_at_ms", "lease_expires_at_ms")
    ELEMENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    element: str
    message_id: int
    delivery_count: int
    enqueued_at_ms: int
    lease_expires_at_ms: int
    def __init__(self, element: _Optional[str] = ..., message_id: _Optional[int] = ..., delivery_count: _Optional[int] = ..., enqueued_at_ms: _Optional[int] = ..., lease_expires_at_ms: _Optional[int] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class AckResult(_message.Message):
    __slots__ = ("message_id", "code")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    message_id: int
    code: Code
    def __init__(self, message_id: _Optional[int] = ..., code: _Optional[_Union[Code, str]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("initial_delay_ms", "multiplier", "max_delay_ms")
    INITIAL_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    initial_delay_ms: int
    multiplier: float
    max_delay_ms: int
    def __init__(self, initial_delay_ms: _Optional[int] = ..., multiplier: _Optional[float] = ..., max_delay_ms: _Optional[int] = ...) -> None: ...

class QueueSettings(_message.Message):
    __slots__ = ("ack_deadline_ms", "max_deliveries", "dead_letter_queue", "retry_delay", "delay_ms", "max_age_ms", "max_length")
    ACK_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_QUEUE_FIELD_NUMBER: _ClassVar[int]
    RETRY_DELAY_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ack_deadline_ms: int
    max_deliveries: int
    dead_letter_queue: str
    retry_delay: RetryPolicy
    delay_ms: int
    max_age_ms: int
    max_length: int
    def __init__(self, ack_deadline_ms: _Optional[int] = ..., max_deliveries: _Optional[int] = ..., dead_letter_queue: _Optional[str] = ..., retry_delay: _Optional[_Union[RetryPolicy, _Mapping]] = ..., delay_ms: _Optional[int] = ..., max_age_ms: _Optional[int] = ..., max_length: _Optional[int] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("message_id", "original_queue", "delivery_count", "enqueued_at_ms", "dead_lettered_at_ms", "cause", "element")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_QUEUE_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_FIELD_NUMBER: _ClassVar[int]
    message_id: int
    original_queue: str
    delivery_count: int
    enqueued_at_ms: int
    dead_lettered_at_ms: int
    cause: str
    element: str
    def __init__(self, message_id: _Optional[int] = ..., original_queue: _Optional[str] = ..., delivery_count: _Optional[int] = ..., enqueued_at_ms: _Optional[int] = ..., dead_lettered_at_ms: _Optional[int] = ..., cause: _Optional[str] = ..., element: _Optional[str] = ...) -> None: ...

class LeaseResult(_message.Message):
    __slots__ = ("message_id", "code", "lease_expires_at_ms")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    message_id: int
    code: Code
    lease_expires_at_ms: int
    def __init__(self, message_id: _Optional[int] = ..., code: _Optional[_Union[Code, str]] = ..., lease_expires_at_ms: _Optional[int] = ...) -> None: ...

class QueueSummary(_message.Message):
    __slots__ = ("name", "ready", "in_flight", "delayed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DELAYED_FIELD_NUMBER: _ClassVar[int]
    name: str
    ready: int
    in_flight: int
    delayed: int
    def __init__(self, name: _Optional[str] = ..., ready: _Optional[int] = ..., in_flight: _Optional[int] = ..., delayed: _Optional[int] = ...) -> None: ...

class GetChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetChallengeResponse(_message.Message):
    __slots__ = ("code", "message", "public_key_pem", "fingerprint", "algorithm", "challenge", "challenge_ttl_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    public_key_pem: str
    fingerprint: str
    algorithm: str
    challenge: bytes
    challenge_ttl_ms: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., public_key_pem: _Optional[str] = ..., fingerprint: _Optional[str] = ..., algorithm: _Optional[str] = ..., challenge: _Optional[bytes] = ..., challenge_ttl_ms: _Optional[int] = ...) -> None: ...

class AuthRequest(_message.Message):
    __slots__ = ("username", "password")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    username: str
    password: bytes
    def __init__(self, username: _Optional[str] = ..., password: _Optional[bytes] = ...) -> None: ...

class AuthResponse(_message.Message):
    __slots__ = ("code", "message", "token", "session_ttl_ms", "max_batch", "max_request_bytes")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    token: str
    session_ttl_ms: int
    max_batch: int
    max_request_bytes: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., token: _Optional[str] = ..., session_ttl_ms: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_request_bytes: _Optional[int] = ...) -> None: ...

class HeartBeatRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class HeartBeatResponse(_message.Message):
    __slots__ = ("code", "message", "session")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    session: SessionStatus
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., session: _Optional[_Union[SessionStatus, _Mapping]] = ...) -> None: ...

class SessionStatus(_message.Message):
    __slots__ = ("session_id", "expires_in_ms", "messages_held", "subscriptions")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_HELD_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    expires_in_ms: int
    messages_held: int
    subscriptions: int
    def __init__(self, session_id: _Optional[int] = ..., expires_in_ms: _Optional[int] = ..., messages_held: _Optional[int] = ..., subscriptions: _Optional[int] = ...) -> None: ...

class SessionSummary(_message.Message):
    __slots__ = ("session_id", "username", "peer", "created_at_ms", "last_active_at_ms", "messages_held", "subscriptions")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_AT_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_HELD_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    username: str
    peer: str
    created_at_ms: int
    last_active_at_ms: int
    messages_held: int
    subscriptions: int
    def __init__(self, session_id: _Optional[int] = ..., username: _Optional[str] = ..., peer: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., last_active_at_ms: _Optional[int] = ..., messages_held: _Optional[int] = ..., subscriptions: _Optional[int] = ...) -> None: ...

class LogoutRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class LogoutResponse(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class NewQueueRequest(_message.Message):
    __slots__ = ("token", "queue_name", "settings")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    settings: QueueSettings
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., settings: _Optional[_Union[QueueSettings, _Mapping]] = ...) -> None: ...

class NewQueueResponse(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("token", "queue_name", "element", "delay_ms", "request_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    element: str
    delay_ms: int
    request_id: str
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., element: _Optional[str] = ..., delay_ms: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class AddResponse(_message.Message):
    __slots__ = ("code", "message", "message_id", "replayed")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    message_id: int
    replayed: bool
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., message_id: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class AddAllRequest(_message.Message):
    __slots__ = ("token", "queue_name", "elements", "delay_ms", "request_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    elements: _containers.RepeatedScalarFieldContainer[str]
    delay_ms: int
    request_id: str
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., elements: _Optional[_Iterable[str]] = ..., delay_ms: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class AddAllResponse(_message.Message):
    __slots__ = ("code", "message", "message_ids", "replayed")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    message_ids: _containers.RepeatedScalarFieldContainer[int]
    replayed: bool
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., message_ids: _Optional[_Iterable[int]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("token", "queue_name", "wait_ms", "ack_deadline_ms")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    ACK_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    wait_ms: int
    ack_deadline_ms: int
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., wait_ms: _Optional[int] = ..., ack_deadline_ms: _Optional[int] = ...) -> None: ...

class PollResponse(_message.Message):
    __slots__ = ("code", "message", "element", "message_id", "delivery_count", "enqueued_at_ms", "lease_expires_at_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    element: str
    message_id: int
    delivery_count: int
    enqueued_at_ms: int
    lease_expires_at_ms: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., element: _Optional[str] = ..., message_id: _Optional[int] = ..., delivery_count: _Optional[int] = ..., enqueued_at_ms: _Optional[int] = ..., lease_expires_at_ms: _Optional[int] = ...) -> None: ...

class PullElementsRequest(_message.Message):
    __slots__ = ("token", "queue_name", "number", "wait_ms", "ack_deadline_ms")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    ACK_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    number: int
    wait_ms: int
    ack_deadline_ms: int
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., number: _Optional[int] = ..., wait_ms: _Optional[int] = ..., ack_deadline_ms: _Optional[int] = ...) -> None: ...

class PullElementsResponse(_message.Message):
    __slots__ = ("code", "message", "element_info", "number")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_INFO_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    element_info: _containers.RepeatedCompositeFieldContainer[ElementInfo]
    number: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., element_info: _Optional[_Iterable[_Union[ElementInfo, _Mapping]]] = ..., number: _Optional[int] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("token", "message_id", "ack_type")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ACK_TYPE_FIELD_NUMBER: _ClassVar[int]
    token: str
    message_id: int
    ack_type: AckType
    def __init__(self, token: _Optional[str] = ..., message_id: _Optional[int] = ..., ack_type: _Optional[_Union[AckType, str]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class BatchAckRequest(_message.Message):
    __slots__ = ("token", "message_ids", "ack_type")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    ACK_TYPE_FIELD_NUMBER: _ClassVar[int]
    token: str
    message_ids: _containers.RepeatedScalarFieldContainer[int]
    ack_type: AckType
    def __init__(self, token: _Optional[str] = ..., message_ids: _Optional[_Iterable[int]] = ..., ack_type: _Optional[_Union[AckType, str]] = ...) -> None: ...

class BatchAckResponse(_message.Message):
    __slots__ = ("code", "message", "results")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    results: _containers.RepeatedCompositeFieldContainer[AckResult]
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., results: _Optional[_Iterable[_Union[AckResult, _Mapping]]] = ...) -> None: ...

class SizeRequest(_message.Message):
    __slots__ = ("token", "queue_name")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ...) -> None: ...

class SizeResponse(_message.Message):
    __slots__ = ("code", "message", "size")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    size: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class IsEmptyRequest(_message.Message):
    __slots__ = ("token", "queue_name")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ...) -> None: ...

class IsEmptyResponse(_message.Message):
    __slots__ = ("code", "message", "empty")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EMPTY_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    empty: bool
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., empty: _Optional[bool] = ...) -> None: ...

class DestroyQueueRequest(_message.Message):
    __slots__ = ("token", "queue_name", "force")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    force: bool
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DestroyQueueResponse(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class GetUncheckNumRequest(_message.Message):
    __slots__ = ("token", "queue_name")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ...) -> None: ...

class GetUncheckNumResponse(_message.Message):
    __slots__ = ("code", "message", "ack_num")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACK_NUM_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    ack_num: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., ack_num: _Optional[int] = ...) -> None: ...

class MapPutRequest(_message.Message):
    __slots__ = ("token", "map", "key", "value")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    token: str
    map: str
    key: str
    value: str
    def __init__(self, token: _Optional[str] = ..., map: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class MapPutResponse(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class MapRemoveRequest(_message.Message):
    __slots__ = ("token", "map", "key")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    token: str
    map: str
    key: str
    def __init__(self, token: _Optional[str] = ..., map: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class MapRemoveResponse(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class MapGetRequest(_message.Message):
    __slots__ = ("token", "map", "key")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    token: str
    map: str
    key: str
    def __init__(self, token: _Optional[str] = ..., map: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class MapGetResponse(_message.Message):
    __slots__ = ("code", "message", "value")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    value: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class MapGetAllRequest(_message.Message):
    __slots__ = ("token", "map")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    token: str
    map: str
    def __init__(self, token: _Optional[str] = ..., map: _Optional[str] = ...) -> None: ...

class MapGetAllResponse(_message.Message):
    __slots__ = ("code", "message", "map")
    class MapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    map: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., map: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MapDestroyRequest(_message.Message):
    __slots__ = ("token", "map")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    token: str
    map: str
    def __init__(self, token: _Optional[str] = ..., map: _Optional[str] = ...) -> None: ...

class MapDestroyResponse(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class MapGetListRequest(_message.Message):
    __slots__ = ("token", "map", "offset", "size", "start_after")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    token: str
    map: str
    offset: int
    size: int
    start_after: str
    def __init__(self, token: _Optional[str] = ..., map: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., start_after: _Optional[str] = ...) -> None: ...

class MapGetListResponse(_message.Message):
    __slots__ = ("code", "message", "offset", "size", "list", "next_key")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    NEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    offset: int
    size: int
    list: _containers.RepeatedCompositeFieldContainer[KeyValue]
    next_key: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., list: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., next_key: _Optional[str] = ...) -> None: ...

class MapBatchPutRequest(_message.Message):
    __slots__ = ("token", "map", "size", "list")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    token: str
    map: str
    size: int
    list: _containers.RepeatedCompositeFieldContainer[KeyValue]
    def __init__(self, token: _Optional[str] = ..., map: _Optional[str] = ..., size: _Optional[int] = ..., list: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ...) -> None: ...

class MapBatchPutResponse(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class UpdateQueueRequest(_message.Message):
    __slots__ = ("token", "queue_name", "settings")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    settings: QueueSettings
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., settings: _Optional[_Union[QueueSettings, _Mapping]] = ...) -> None: ...

class UpdateQueueResponse(_message.Message):
    __slots__ = ("code", "message", "settings")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    settings: QueueSettings
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., settings: _Optional[_Union[QueueSettings, _Mapping]] = ...) -> None: ...

class GetQueueInfoRequest(_message.Message):
    __slots__ = ("token", "queue_name")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ...) -> None: ...

class GetQueueInfoResponse(_message.Message):
    __slots__ = ("code", "message", "settings", "ready", "delayed", "in_flight", "dead_lettered", "oldest_ready_age_ms", "holding_sessions", "subscriptions", "dead_letters_held")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DELAYED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_READY_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    HOLDING_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_HELD_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    settings: QueueSettings
    ready: int
    delayed: int
    in_flight: int
    dead_lettered: int
    oldest_ready_age_ms: int
    holding_sessions: int
    subscriptions: int
    dead_letters_held: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., settings: _Optional[_Union[QueueSettings, _Mapping]] = ..., ready: _Optional[int] = ..., delayed: _Optional[int] = ..., in_flight: _Optional[int] = ..., dead_lettered: _Optional[int] = ..., oldest_ready_age_ms: _Optional[int] = ..., holding_sessions: _Optional[int] = ..., subscriptions: _Optional[int] = ..., dead_letters_held: _Optional[int] = ...) -> None: ...

class ExtendLeaseRequest(_message.Message):
    __slots__ = ("token", "message_ids", "ack_deadline_ms")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    ACK_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    token: str
    message_ids: _containers.RepeatedScalarFieldContainer[int]
    ack_deadline_ms: int
    def __init__(self, token: _Optional[str] = ..., message_ids: _Optional[_Iterable[int]] = ..., ack_deadline_ms: _Optional[int] = ...) -> None: ...

class ExtendLeaseResponse(_message.Message):
    __slots__ = ("code", "message", "results")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    results: _containers.RepeatedCompositeFieldContainer[LeaseResult]
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., results: _Optional[_Iterable[_Union[LeaseResult, _Mapping]]] = ...) -> None: ...

class PurgeRequest(_message.Message):
    __slots__ = ("token", "queue_name")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ...) -> None: ...

class PurgeResponse(_message.Message):
    __slots__ = ("code", "message", "purged")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PURGED_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    purged: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., purged: _Optional[int] = ...) -> None: ...

class RedriveRequest(_message.Message):
    __slots__ = ("token", "queue_name", "message_ids")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    message_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., message_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RedriveResponse(_message.Message):
    __slots__ = ("code", "message", "moved", "results")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    moved: int
    results: _containers.RepeatedCompositeFieldContainer[AckResult]
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., moved: _Optional[int] = ..., results: _Optional[_Iterable[_Union[AckResult, _Mapping]]] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("token", "queue_name", "after_id", "limit")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    after_id: int
    limit: int
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., after_id: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("code", "message", "dead_letters", "next_after_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    next_after_id: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ..., next_after_id: _Optional[int] = ...) -> None: ...

class ListQueuesRequest(_message.Message):
    __slots__ = ("token", "start_after", "limit")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    token: str
    start_after: str
    limit: int
    def __init__(self, token: _Optional[str] = ..., start_after: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListQueuesResponse(_message.Message):
    __slots__ = ("code", "message", "queues", "next_start_after")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    NEXT_START_AFTER_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    queues: _containers.RepeatedCompositeFieldContainer[QueueSummary]
    next_start_after: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., queues: _Optional[_Iterable[_Union[QueueSummary, _Mapping]]] = ..., next_start_after: _Optional[str] = ...) -> None: ...

class ListMapsRequest(_message.Message):
    __slots__ = ("token", "start_after", "limit")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    token: str
    start_after: str
    limit: int
    def __init__(self, token: _Optional[str] = ..., start_after: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListMapsResponse(_message.Message):
    __slots__ = ("code", "message", "names", "next_start_after")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    NEXT_START_AFTER_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    names: _containers.RepeatedScalarFieldContainer[str]
    next_start_after: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., next_start_after: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("token", "start_after", "limit", "username")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    start_after: int
    limit: int
    username: str
    def __init__(self, token: _Optional[str] = ..., start_after: _Optional[int] = ..., limit: _Optional[int] = ..., username: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("code", "message", "sessions", "next_start_after")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_START_AFTER_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    sessions: _containers.RepeatedCompositeFieldContainer[SessionSummary]
    next_start_after: int
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., sessions: _Optional[_Iterable[_Union[SessionSummary, _Mapping]]] = ..., next_start_after: _Optional[int] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("token", "session_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    session_id: int
    def __init__(self, token: _Optional[str] = ..., session_id: _Optional[int] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class SubscribeOpen(_message.Message):
    __slots__ = ("token", "queue_name", "max_unacked", "ack_deadline_ms")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_UNACKED_FIELD_NUMBER: _ClassVar[int]
    ACK_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    token: str
    queue_name: str
    max_unacked: int
    ack_deadline_ms: int
    def __init__(self, token: _Optional[str] = ..., queue_name: _Optional[str] = ..., max_unacked: _Optional[int] = ..., ack_deadline_ms: _Optional[int] = ...) -> None: ...

class SubscribeAck(_message.Message):
    __slots__ = ("message_ids", "ack_type")
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    ACK_TYPE_FIELD_NUMBER: _ClassVar[int]
    message_ids: _containers.RepeatedScalarFieldContainer[int]
    ack_type: AckType
    def __init__(self, message_ids: _Optional[_Iterable[int]] = ..., ack_type: _Optional[_Union[AckType, str]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("open", "ack")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    open: SubscribeOpen
    ack: SubscribeAck
    def __init__(self, open: _Optional[_Union[SubscribeOpen, _Mapping]] = ..., ack: _Optional[_Union[SubscribeAck, _Mapping]] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("code", "message", "element_info", "ack_results")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_INFO_FIELD_NUMBER: _ClassVar[int]
    ACK_RESULTS_FIELD_NUMBER: _ClassVar[int]
    code: Code
    message: str
    element_info: _containers.RepeatedCompositeFieldContainer[ElementInfo]
    ack_results: _containers.RepeatedCompositeFieldContainer[AckResult]
    def __init__(self, code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., element_info: _Optional[_Iterable[_Union[ElementInfo, _Mapping]]] = ..., ack_results: _Optional[_Iterable[_Union[AckResult, _Mapping]]] = ...) -> None: ...
