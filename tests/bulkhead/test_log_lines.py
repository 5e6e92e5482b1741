"""`bulkhead up` turns each service's JSON log line into one readable line, traceback included."""

from __future__ import annotations

import json

from bulkhead_cli.supervisor import format_log_line


def test_a_line_shows_level_message_and_tags():
    line = json.dumps({"level": "WARNING", "message": "lease dropped", "tenant_id": "t_a", "reason": "X"})
    out = format_log_line("inference", line)
    assert out.startswith("[   inference]") and "lease dropped" in out and "tenant_id=t_a" in out


def test_an_error_line_keeps_its_traceback_under_the_service_name():
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\nRuntimeError: relation missing'
    record = {"level": "ERROR", "message": "release failed", "exception": trace}
    out = format_log_line("credentials", json.dumps(record))
    rows = out.splitlines()
    assert "release failed" in rows[0]
    assert rows[-1] == "[ credentials]   RuntimeError: relation missing"
    assert all(r.startswith("[ credentials]") for r in rows)


def test_a_line_that_is_not_json_passes_through():
    assert format_log_line("state", "plain text") == "[       state] plain text"
