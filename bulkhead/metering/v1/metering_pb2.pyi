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

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_SUCCESS: _ClassVar[Outcome]
    OUTCOME_ERROR: _ClassVar[Outcome]
    OUTCOME_REJECTED: _ClassVar[Outcome]
    OUTCOME_CANCELLED: _ClassVar[Outcome]

class UsageGrouping(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_GROUPING_UNSPECIFIED: _ClassVar[UsageGrouping]
    USAGE_GROUPING_MODEL: _ClassVar[UsageGrouping]
    USAGE_GROUPING_AGENT: _ClassVar[UsageGrouping]
    USAGE_GROUPING_PRINCIPAL: _ClassVar[UsageGrouping]
    USAGE_GROUPING_DAY: _ClassVar[UsageGrouping]
    USAGE_GROUPING_HOUR: _ClassVar[UsageGrouping]

class ChargebackPeriod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHARGEBACK_PERIOD_UNSPECIFIED: _ClassVar[ChargebackPeriod]
    CHARGEBACK_PERIOD_DAY: _ClassVar[ChargebackPeriod]
    CHARGEBACK_PERIOD_MONTH: _ClassVar[ChargebackPeriod]

class BudgetUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_UNIT_UNSPECIFIED: _ClassVar[BudgetUnit]
    BUDGET_UNIT_TOKENS: _ClassVar[BudgetUnit]
    BUDGET_UNIT_MICRO_USD: _ClassVar[BudgetUnit]

class BudgetPeriod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_PERIOD_UNSPECIFIED: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_DAY: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_MONTH: _ClassVar[BudgetPeriod]

class BudgetMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_MODE_UNSPECIFIED: _ClassVar[BudgetMode]
    BUDGET_MODE_HARD: _ClassVar[BudgetMode]
    BUDGET_MODE_SOFT: _ClassVar[BudgetMode]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_SUCCESS: Outcome
OUTCOME_ERROR: Outcome
OUTCOME_REJECTED: Outcome
OUTCOME_CANCELLED: Outcome
USAGE_GROUPING_UNSPECIFIED: UsageGrouping
USAGE_GROUPING_MODEL: UsageGrouping
USAGE_GROUPING_AGENT: UsageGrouping
USAGE_GROUPING_PRINCIPAL: UsageGrouping
USAGE_GROUPING_DAY: UsageGrouping
USAGE_GROUPING_HOUR: UsageGrouping
CHARGEBACK_PERIOD_UNSPECIFIED: ChargebackPeriod
CHARGEBACK_PERIOD_DAY: ChargebackPeriod
CHARGEBACK_PERIOD_MONTH: ChargebackPeriod
BUDGET_UNIT_UNSPECIFIED: BudgetUnit
BUDGET_UNIT_TOKENS: BudgetUnit
BUDGET_UNIT_MICRO_USD: BudgetUnit
BUDGET_PERIOD_UNSPECIFIED: BudgetPeriod
BUDGET_PERIOD_DAY: BudgetPeriod
BUDGET_PERIOD_MONTH: BudgetPeriod
BUDGET_MODE_UNSPECIFIED: BudgetMode
BUDGET_MODE_HARD: BudgetMode
BUDGET_MODE_SOFT: BudgetMode

class TokenCounts(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cache_write_tokens: _Optional[int] = ..., cache_read_tokens: _Optional[int] = ...) -> None: ...

class UsageEvent(_message.Message):
    __slots__ = ("idempotency_key", "principal_id", "agent_id", "run_id", "model", "tokens", "latency_ms", "outcome", "occur_time", "trace_id")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    OCCUR_TIME_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    principal_id: str
    agent_id: str
    run_id: str
    model: str
    tokens: TokenCounts
    latency_ms: int
    outcome: Outcome
    occur_time: _timestamp_pb2.Timestamp
    trace_id: str
    def __init__(self, idempotency_key: _Optional[str] = ..., principal_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., model: _Optional[str] = ..., tokens: _Optional[_Union[TokenCounts, _Mapping]] = ..., latency_ms: _Optional[int] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., occur_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ...) -> None: ...

class RecordUsageRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[UsageEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[UsageEvent, _Mapping]]] = ...) -> None: ...

class RecordTenantUsageRequest(_message.Message):
    __slots__ = ("tenant_id", "tier", "events")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    events: _containers.RepeatedCompositeFieldContainer[UsageEvent]
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., events: _Optional[_Iterable[_Union[UsageEvent, _Mapping]]] = ...) -> None: ...

class RecordTenantUsageResponse(_message.Message):
    __slots__ = ("recorded_count", "duplicate_count")
    RECORDED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    recorded_count: int
    duplicate_count: int
    def __init__(self, recorded_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ...) -> None: ...

class RecordUsageResponse(_message.Message):
    __slots__ = ("recorded_count", "duplicate_count")
    RECORDED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    recorded_count: int
    duplicate_count: int
    def __init__(self, recorded_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ...) -> None: ...

class UsageFilter(_message.Message):
    __slots__ = ("start_time", "end_time", "model", "agent_id", "principal_id")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    model: str
    agent_id: str
    principal_id: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., agent_id: _Optional[str] = ..., principal_id: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("tenant_id", "model", "agent_id", "principal_id", "period_start", "event_count", "error_count", "tokens", "cost_usd", "unpriced_tokens")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    UNPRICED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    model: str
    agent_id: str
    principal_id: str
    period_start: _timestamp_pb2.Timestamp
    event_count: int
    error_count: int
    tokens: TokenCounts
    cost_usd: str
    unpriced_tokens: int
    def __init__(self, tenant_id: _Optional[str] = ..., model: _Optional[str] = ..., agent_id: _Optional[str] = ..., principal_id: _Optional[str] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., event_count: _Optional[int] = ..., error_count: _Optional[int] = ..., tokens: _Optional[_Union[TokenCounts, _Mapping]] = ..., cost_usd: _Optional[str] = ..., unpriced_tokens: _Optional[int] = ...) -> None: ...

class QueryUsageRequest(_message.Message):
    __slots__ = ("filter", "group_by", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: UsageFilter
    group_by: _containers.RepeatedScalarFieldContainer[UsageGrouping]
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[UsageFilter, _Mapping]] = ..., group_by: _Optional[_Iterable[_Union[UsageGrouping, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class QueryUsageResponse(_message.Message):
    __slots__ = ("rows", "next_page_token")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    next_page_token: str
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class QueryTenantUsageRequest(_message.Message):
    __slots__ = ("tenant_id", "filter", "group_by", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    filter: UsageFilter
    group_by: _containers.RepeatedScalarFieldContainer[UsageGrouping]
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., filter: _Optional[_Union[UsageFilter, _Mapping]] = ..., group_by: _Optional[_Iterable[_Union[UsageGrouping, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class QueryTenantUsageResponse(_message.Message):
    __slots__ = ("rows", "next_page_token")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    next_page_token: str
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ChargebackLine(_message.Message):
    __slots__ = ("tenant_id", "period_start", "model", "event_count", "tokens", "cost_usd")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    period_start: _timestamp_pb2.Timestamp
    model: str
    event_count: int
    tokens: TokenCounts
    cost_usd: str
    def __init__(self, tenant_id: _Optional[str] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., event_count: _Optional[int] = ..., tokens: _Optional[_Union[TokenCounts, _Mapping]] = ..., cost_usd: _Optional[str] = ...) -> None: ...

class ExportChargebackRequest(_message.Message):
    __slots__ = ("tenant_id", "start_time", "end_time", "period")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    period: ChargebackPeriod
    def __init__(self, tenant_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period: _Optional[_Union[ChargebackPeriod, str]] = ...) -> None: ...

class ExportChargebackResponse(_message.Message):
    __slots__ = ("lines", "total_cost_usd")
    LINES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_USD_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[ChargebackLine]
    total_cost_usd: str
    def __init__(self, lines: _Optional[_Iterable[_Union[ChargebackLine, _Mapping]]] = ..., total_cost_usd: _Optional[str] = ...) -> None: ...

class Price(_message.Message):
    __slots__ = ("model", "effective_time", "input_micros_per_mtok", "output_micros_per_mtok", "cache_write_micros_per_mtok", "cache_read_micros_per_mtok")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    INPUT_MICROS_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MICROS_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_MICROS_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_MICROS_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    model: str
    effective_time: _timestamp_pb2.Timestamp
    input_micros_per_mtok: int
    output_micros_per_mtok: int
    cache_write_micros_per_mtok: int
    cache_read_micros_per_mtok: int
    def __init__(self, model: _Optional[str] = ..., effective_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., input_micros_per_mtok: _Optional[int] = ..., output_micros_per_mtok: _Optional[int] = ..., cache_write_micros_per_mtok: _Optional[int] = ..., cache_read_micros_per_mtok: _Optional[int] = ...) -> None: ...

class SetPriceRequest(_message.Message):
    __slots__ = ("price",)
    PRICE_FIELD_NUMBER: _ClassVar[int]
    price: Price
    def __init__(self, price: _Optional[_Union[Price, _Mapping]] = ...) -> None: ...

class SetPriceResponse(_message.Message):
    __slots__ = ("price",)
    PRICE_FIELD_NUMBER: _ClassVar[int]
    price: Price
    def __init__(self, price: _Optional[_Union[Price, _Mapping]] = ...) -> None: ...

class ListPricesRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPricesResponse(_message.Message):
    __slots__ = ("prices", "next_page_token")
    PRICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prices: _containers.RepeatedCompositeFieldContainer[Price]
    next_page_token: str
    def __init__(self, prices: _Optional[_Iterable[_Union[Price, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("unit", "limit", "period", "mode")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    unit: BudgetUnit
    limit: int
    period: BudgetPeriod
    mode: BudgetMode
    def __init__(self, unit: _Optional[_Union[BudgetUnit, str]] = ..., limit: _Optional[int] = ..., period: _Optional[_Union[BudgetPeriod, str]] = ..., mode: _Optional[_Union[BudgetMode, str]] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("tenant_id", "requests_per_minute", "tokens_per_minute", "concurrent_calls", "budgets", "update_time")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENT_CALLS_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    requests_per_minute: int
    tokens_per_minute: int
    concurrent_calls: int
    budgets: _containers.RepeatedCompositeFieldContainer[Budget]
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., concurrent_calls: _Optional[int] = ..., budgets: _Optional[_Iterable[_Union[Budget, _Mapping]]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetQuotaRequest(_message.Message):
    __slots__ = ("quota",)
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    quota: Quota
    def __init__(self, quota: _Optional[_Union[Quota, _Mapping]] = ...) -> None: ...

class SetQuotaResponse(_message.Message):
    __slots__ = ("quota",)
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    quota: Quota
    def __init__(self, quota: _Optional[_Union[Quota, _Mapping]] = ...) -> None: ...

class GetQuotaRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetQuotaResponse(_message.Message):
    __slots__ = ("quota",)
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    quota: Quota
    def __init__(self, quota: _Optional[_Union[Quota, _Mapping]] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("budget", "period_start", "period_end", "used", "held", "remaining")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    period_start: _timestamp_pb2.Timestamp
    period_end: _timestamp_pb2.Timestamp
    used: int
    held: int
    remaining: int
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., used: _Optional[int] = ..., held: _Optional[int] = ..., remaining: _Optional[int] = ...) -> None: ...

class GetQuotaStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetQuotaStatusResponse(_message.Message):
    __slots__ = ("quota", "budgets")
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    quota: Quota
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    def __init__(self, quota: _Optional[_Union[Quota, _Mapping]] = ..., budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ...) -> None: ...

class ReserveBudgetRequest(_message.Message):
    __slots__ = ("model", "prompt_tokens", "max_output_tokens", "ttl_seconds", "idempotency_key")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_tokens: int
    max_output_tokens: int
    ttl_seconds: int
    idempotency_key: str
    def __init__(self, model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class Hold(_message.Message):
    __slots__ = ("tokens", "micro_usd")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    micro_usd: int
    def __init__(self, tokens: _Optional[int] = ..., micro_usd: _Optional[int] = ...) -> None: ...

class ReserveBudgetResponse(_message.Message):
    __slots__ = ("reservation_id", "held", "expire_time", "over_budget")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    OVER_BUDGET_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    held: Hold
    expire_time: _timestamp_pb2.Timestamp
    over_budget: bool
    def __init__(self, reservation_id: _Optional[str] = ..., held: _Optional[_Union[Hold, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., over_budget: _Optional[bool] = ...) -> None: ...

class CommitBudgetRequest(_message.Message):
    __slots__ = ("reservation_id", "usage")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    usage: TokenCounts
    def __init__(self, reservation_id: _Optional[str] = ..., usage: _Optional[_Union[TokenCounts, _Mapping]] = ...) -> None: ...

class CommitBudgetResponse(_message.Message):
    __slots__ = ("charged", "released")
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    charged: Hold
    released: Hold
    def __init__(self, charged: _Optional[_Union[Hold, _Mapping]] = ..., released: _Optional[_Union[Hold, _Mapping]] = ...) -> None: ...

class ReleaseBudgetRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseBudgetResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: Hold
    def __init__(self, released: _Optional[_Union[Hold, _Mapping]] = ...) -> None: ...

class LeaseBudgetRequest(_message.Message):
    __slots__ = ("model", "tokens", "min_tokens", "ttl_seconds", "holder")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    model: str
    tokens: int
    min_tokens: int
    ttl_seconds: int
    holder: str
    def __init__(self, model: _Optional[str] = ..., tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., holder: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "model", "granted", "spent", "expire_time", "holder", "in_flight_tokens")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    model: str
    granted: Hold
    spent: TokenCounts
    expire_time: _timestamp_pb2.Timestamp
    holder: str
    in_flight_tokens: int
    def __init__(self, lease_id: _Optional[str] = ..., model: _Optional[str] = ..., granted: _Optional[_Union[Hold, _Mapping]] = ..., spent: _Optional[_Union[TokenCounts, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., holder: _Optional[str] = ..., in_flight_tokens: _Optional[int] = ...) -> None: ...

class LeaseBudgetResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "spent", "ttl_seconds", "in_flight_tokens")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    spent: TokenCounts
    ttl_seconds: int
    in_flight_tokens: int
    def __init__(self, lease_id: _Optional[str] = ..., spent: _Optional[_Union[TokenCounts, _Mapping]] = ..., ttl_seconds: _Optional[int] = ..., in_flight_tokens: _Optional[int] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "spent")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    spent: TokenCounts
    def __init__(self, lease_id: _Optional[str] = ..., spent: _Optional[_Union[TokenCounts, _Mapping]] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("charged", "released")
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    charged: Hold
    released: Hold
    def __init__(self, charged: _Optional[_Union[Hold, _Mapping]] = ..., released: _Optional[_Union[Hold, _Mapping]] = ...) -> None: ...

class ReleaseTenantLeaseRequest(_message.Message):
    __slots__ = ("tenant_id", "tier", "lease_id", "spent")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: _tenancy_pb2.Tier
    lease_id: str
    spent: TokenCounts
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[_tenancy_pb2.Tier, str]] = ..., lease_id: _Optional[str] = ..., spent: _Optional[_Union[TokenCounts, _Mapping]] = ...) -> None: ...

class ReleaseTenantLeaseResponse(_message.Message):
    __slots__ = ("charged", "released")
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    charged: Hold
    released: Hold
    def __init__(self, charged: _Optional[_Union[Hold, _Mapping]] = ..., released: _Optional[_Union[Hold, _Mapping]] = ...) -> None: ...
