"""Errors stay small whatever input they echo: at most 1 KB of details, ErrorInfo always first."""

from __future__ import annotations

from google.rpc import error_details_pb2

from shared import errors


def _unpacked(status):
    out = []
    for any_msg in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
        ):
            if any_msg.Is(cls.DESCRIPTOR):
                out.append(cls.__name__)
    return out


def test_thousands_of_long_violations_fit_in_one_kilobyte():
    """A BadRequest echoing 1,000 fields of 5,000 characters is cut to fit; the reason survives."""
    error = errors.InvalidArgument(
        "x" * 5000,
        reason="INVALID_QUERY",
        violations={f"field{i}" + "f" * 5000: "d" * 5000 for i in range(1000)},
        metadata={"echo": "v" * 5000},
    )
    status = error.to_status()
    assert status.ByteSize() <= errors.MAX_DETAILS_BYTES
    assert _unpacked(status)[0] == "ErrorInfo"
    assert len(error.message.encode()) <= 2 * errors.MAX_ECHO_BYTES and error.message.endswith("\u2026")


def test_retry_info_survives_a_large_quota_failure():
    """RESOURCE_EXHAUSTED keeps its RetryInfo even when the QuotaFailure had to be left out."""
    error = errors.ResourceExhausted("over", violations=[("s" * 300, "d" * 300)] * 30, retry_after=2.5)
    status = error.to_status()
    assert status.ByteSize() <= errors.MAX_DETAILS_BYTES
    assert "RetryInfo" in _unpacked(status) and _unpacked(status)[0] == "ErrorInfo"


def test_small_errors_are_unchanged():
    """An ordinary error keeps its message, metadata and every violation."""
    error = errors.InvalidArgument("bad page_size", violations={"page_size": ">= 0"}, metadata={"k": "v"})
    assert _unpacked(error.to_status()) == ["ErrorInfo", "BadRequest"]
    assert error.message == "bad page_size" and error.metadata == {"k": "v"}


def test_unavailable_with_a_retry_delay_carries_it_as_retry_pushback():
    """A channel's retry policy waits as long as the server asked (gRFC A6), and only for UNAVAILABLE."""
    pushback = lambda err: dict(errors.trailing_metadata(err)).get("grpc-retry-pushback-ms")  # noqa: E731
    assert pushback(errors.Unavailable("database away", retry_after=1.5)) == "1500"
    assert pushback(errors.Unavailable("down")) is None
    assert pushback(errors.ResourceExhausted("budget", retry_after=2.0)) is None


def test_echoes_are_clipped_by_bytes_not_characters():
    """1,500 four-byte characters echoed into a message and a field violation still fit in 1 KB."""
    wide = "\U0001f600" * 1500
    error = errors.InvalidArgument(f"bad name {wide}", violations={"name": wide, wide: "bad"})
    assert len(error.message.encode()) <= 2 * errors.MAX_ECHO_BYTES
    assert all(len(v.encode()) <= errors.MAX_ECHO_BYTES for kv in error.violations.items() for v in kv)
    assert error.to_status().ByteSize() <= errors.MAX_DETAILS_BYTES
    assert errors.clip("short") == "short" and errors.clip("é" * 150).endswith("\u2026")
