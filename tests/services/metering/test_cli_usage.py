"""`bulkhead usage`: chargeback and query tables, and the CSV file, against a real metering server."""

from __future__ import annotations

import asyncio
import csv

import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from bulkhead_cli import main

from .helpers import T0, event, price

A, B = "t_alpha", "t_bravo"


async def _seed(h) -> None:
    await h.stub.SetPrice(pb.SetPriceRequest(price=price("m1", T0 - 10**12, 2_000_000, 10_000_000)), metadata=h.op())
    await h.stub.RecordUsage(
        pb.RecordUsageRequest(
            events=[event("a1", model="m1", input_tokens=1000, output_tokens=100, agent_id="planner")]
        ),
        metadata=h.md(A),
    )
    await h.stub.RecordUsage(
        pb.RecordUsageRequest(events=[event("b1", model="m1", input_tokens=500, output_tokens=0)]), metadata=h.md(B)
    )


def _env(monkeypatch, h, tenant, scopes, **kw) -> None:
    monkeypatch.setenv("BULKHEAD_METERING_ADDR", h.service.running.address)
    monkeypatch.setenv("BULKHEAD_TOKEN", h.tokens.mint(tenant, scopes, **kw))
    monkeypatch.setenv("BULKHEAD_TENANT", tenant)
    monkeypatch.delenv("BULKHEAD_API_KEY", raising=False)


async def test_chargeback_prints_a_table_and_writes_csv(metering, monkeypatch, tmp_path, capsys):
    """The operator's `bulkhead usage` lists every tenant's lines with exact cost and writes them as CSV."""
    await _seed(metering)
    _env(monkeypatch, metering, "t_platform", ("platform.operator",), principal_id="p_operator")
    out_file = tmp_path / "chargeback.csv"
    code = await asyncio.to_thread(
        main, ["usage", "--since", "2026-03-01", "--until", "2026-04-01", "--csv", str(out_file)]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "TENANT" in text and "total cost: 0.004 USD" in text
    with open(out_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["tenant"], r["period"], r["model"], r["input"], r["cost_usd"]) for r in rows] == [
        (A, "2026-03-01", "m1", "1000", "0.003"),
        (B, "2026-03-01", "m1", "500", "0.001"),
    ]


async def test_query_shows_only_the_callers_tenant(metering, monkeypatch, capsys):
    """`bulkhead usage query` with a tenant's token shows that tenant's rows only."""
    await _seed(metering)
    _env(monkeypatch, metering, B, ("metering.usage.read",))
    code = await asyncio.to_thread(
        main, ["usage", "query", "--by", "model,agent", "--since", "2026-03-01", "--until", "2026-04-01"]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert B in text and A not in text and "planner" not in text


async def test_tenant_cannot_export_chargeback(metering, monkeypatch, capsys):
    """A tenant's `bulkhead usage` (chargeback) fails with a readable permission error."""
    await _seed(metering)
    _env(monkeypatch, metering, B, ("*",))
    with pytest.raises(SystemExit):
        await asyncio.to_thread(main, ["usage", "--since", "2026-03-01", "--until", "2026-04-01"])
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err.upper().replace(" ", "_")
    assert "bulkhead usage query" in err  # where the tenant's own usage is
