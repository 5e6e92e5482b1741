"""JSON log lines with service, tenant, request and trace ids, scrubbed of tokens and secret values."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import OrderedDict

from opentelemetry import trace

from shared.tenancy import current_tenant

REDACTED = "[REDACTED]"
_PATTERNS = [
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+"),  # JWTs
    re.compile(r"bk_t_[A-Za-z0-9]+_k_[A-Za-z0-9]+_[A-Za-z0-9_-]+"),  # Bulkhead API keys
    re.compile(r"sk-ant-[A-Za-z0-9_-]+"),  # Anthropic keys
    re.compile(r"\b(?:hvs|s)\.[A-Za-z0-9]{20,}"),  # Vault/OpenBao tokens
]
_secrets: OrderedDict[str, None] = OrderedDict()
_secrets_lock = threading.Lock()
_MIN_SECRET_LEN = 4  # shorter values would redact ordinary words
MAX_REGISTERED_SECRETS = 4096
"""Values remembered for redaction; the least recently registered are forgotten first, so the set
(and the cost of scrubbing each line) stays bounded however often secrets rotate."""


def register_secret(value: str) -> None:
    """Redact this exact value from every log line from now on (the most recent MAX_REGISTERED_SECRETS)."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _secrets_lock:
            _secrets[value] = None
            _secrets.move_to_end(value)
            while len(_secrets) > MAX_REGISTERED_SECRETS:
                _secrets.popitem(last=False)


def scrub(text: str) -> str:
    """text with tokens, keys and registered secret values replaced by [REDACTED]."""
    for secret in tuple(_secrets):
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


class ScrubFilter(logging.Filter):
    """Renders the message and scrubs it, so no handler ever sees a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, scrub(value))
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, service, logger, message, tenant/request/trace ids, extras."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = current_tenant()
        if ctx is not None:
            line["tenant_id"] = ctx.tenant_id
            line["request_id"] = ctx.request_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"] = format(span.trace_id, "032x")
            line["span_id"] = format(span.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line.setdefault(key, value if isinstance(value, (int, float, bool)) else str(value))
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str)


def setup_logging(service: str, level: str = "INFO", stream=None) -> logging.Handler:
    """Send every log record of this process as scrubbed JSON lines to stream (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(ScrubFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
