from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthorizeRequest(_message.Message):
    __slots__ = ("product", "tenant", "consumer_id", "api_key", "operation", "cost", "hits", "request_id")
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    product: str
    tenant: str
    consumer_id: str
    api_key: str
    operation: str
    cost: int
    hits: int
    request_id: str
    def __init__(self, product: _Optional[str] = ..., tenant: _Optional[str] = ..., consumer_id: _Optional[str] = ..., api_key: _Optional[str] = ..., operation: _Optional[str] = ..., cost: _Optional[int] = ..., hits: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class WindowStatus(_message.Message):
    __slots__ = ("window", "limit", "remaining", "reset")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    window: str
    limit: int
    remaining: int
    reset: int
    def __init__(self, window: _Optional[str] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., reset: _Optional[int] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("allow", "reason", "status", "decision_id", "request_id", "tenant", "consumer_id", "product", "ttl_seconds", "retry_after", "windows", "balance", "charged", "degraded", "replayed")
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    allow: bool
    reason: str
    status: int
    decision_id: str
    request_id: str
    tenant: str
    consumer_id: str
    product: str
    ttl_seconds: int
    retry_after: int
    windows: _containers.RepeatedCompositeFieldContainer[WindowStatus]
    balance: int
    charged: int
    degraded: bool
    replayed: bool
    def __init__(self, allow: _Optional[bool] = ..., reason: _Optional[str] = ..., status: _Optional[int] = ..., decision_id: _Optional[str] = ..., request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., consumer_id: _Optional[str] = ..., product: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., retry_after: _Optional[int] = ..., windows: _Optional[_Iterable[_Union[WindowStatus, _Mapping]]] = ..., balance: _Optional[int] = ..., charged: _Optional[int] = ..., degraded: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class AuthorizeBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[AuthorizeRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[AuthorizeRequest, _Mapping]]] = ...) -> None: ...

class AuthorizeBatchResult(_message.Message):
    __slots__ = ("decision", "error")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    error: Error
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class AuthorizeBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AuthorizeBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AuthorizeBatchResult, _Mapping]]] = ...) -> None: ...

class UsageEvent(_message.Message):
    __slots__ = ("tenant", "consumer_id", "request_id", "product", "route", "service", "method", "status", "started_at_ms", "latency_ms", "upstream_latency_ms", "gateway_latency_ms", "request_size", "response_size", "decision_id", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    consumer_id: str
    request_id: str
    product: str
    route: str
    service: str
    method: str
    status: int
    started_at_ms: int
    latency_ms: int
    upstream_latency_ms: int
    gateway_latency_ms: int
    request_size: int
    response_size: int
    decision_id: str
    headers: _containers.ScalarMap[str, str]
    def __init__(self, tenant: _Optional[str] = ..., consumer_id: _Optional[str] = ..., request_id: _Optional[str] = ..., product: _Optional[str] = ..., route: _Optional[str] = ..., service: _Optional[str] = ..., method: _Optional[str] = ..., status: _Optional[int] = ..., started_at_ms: _Optional[int] = ..., latency_ms: _Optional[int] = ..., upstream_latency_ms: _Optional[int] = ..., gateway_latency_ms: _Optional[int] = ..., request_size: _Optional[int] = ..., response_size: _Optional[int] = ..., decision_id: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UsageAck(_message.Message):
    __slots__ = ("accepted", "duplicates", "rejected", "errors")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    rejected: int
    errors: _containers.RepeatedCompositeFieldContainer[Error]
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[Error, _Mapping]]] = ...) -> None: ...

class ConsumerStatusRequest(_message.Message):
    __slots__ = ("tenant", "consumer_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    consumer_id: str
    def __init__(self, tenant: _Optional[str] = ..., consumer_id: _Optional[str] = ...) -> None: ...

class ConsumerStatus(_message.Message):
    __slots__ = ("tenant", "id", "plan_id", "status", "wallet_mode", "balance", "pending", "version", "windows")
    class WindowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WALLET_MODE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    id: str
    plan_id: str
    status: str
    wallet_mode: str
    balance: int
    pending: int
    version: int
    windows: _containers.ScalarMap[str, int]
    def __init__(self, tenant: _Optional[str] = ..., id: _Optional[str] = ..., plan_id: _Optional[str] = ..., status: _Optional[str] = ..., wallet_mode: _Optional[str] = ..., balance: _Optional[int] = ..., pending: _Optional[int] = ..., version: _Optional[int] = ..., windows: _Optional[_Mapping[str, int]] = ...) -> None: ...
