"""Lease holders and the heartbeat: a lease names the process holding it, each renewal reports the
tokens its calls in flight hold, and a lease whose holder stopped renewing (killed) expires charging
its spend plus those tokens, never more than its grant (SQLite and Postgres, fake clock)."""

from __future__ import annotations

import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2 as pb
from shared.errors import error_details

from .helpers import T0, price
from .test_budgets import MODEL, A, B, _quota, _status, _tokens, _usage

HOLDER = "proxy-7f9c:4242:3b1e0c2a"


@pytest.fixture(params=["sqlite", "postgres"])
def h(request):
    """Metering on SQLite or on Postgres (as the runtime role, under RLS)."""
    return request.getfixturevalue("metering" if request.param == "sqlite" else "pg_metering")


async def _lease(h, tokens, *, holder=HOLDER, ttl=6, tenant=A):
    return (
        await h.stub.LeaseBudget(
            pb.LeaseBudgetRequest(model=MODEL, tokens=tokens, ttl_seconds=ttl, holder=holder), metadata=h.md(tenant)
        )
    ).lease


async def _renew(h, lease_id, *, spent, in_flight, ttl=6, tenant=A):
    return (
        await h.stub.RenewLease(
            pb.RenewLeaseRequest(lease_id=lease_id, spent=spent, in_flight_tokens=in_flight, ttl_seconds=ttl),
            metadata=h.md(tenant),
        )
    ).lease


async def test_a_lease_names_its_holder_and_a_renewal_reports_its_calls_in_flight(h):
    """LeaseBudget records the holder; RenewLease answers it back with the reported in-flight tokens."""
    await h.stub.SetQuota(_quota(A, _tokens(1000)), metadata=h.op())
    lease = await _lease(h, 500)
    assert (lease.holder, lease.in_flight_tokens) == (HOLDER, 0)
    renewed = await _renew(h, lease.lease_id, spent=_usage(i=100, o=20), in_flight=200)
    assert (renewed.holder, renewed.in_flight_tokens, renewed.spent.output_tokens) == (HOLDER, 200, 20)
    renewed = await _renew(h, lease.lease_id, spent=_usage(i=150, o=20), in_flight=0)  # replaces, not adds
    assert renewed.in_flight_tokens == 0
    anonymous = await _lease(h, 100, holder="")
    assert anonymous.holder == ""


async def test_an_expired_lease_charges_its_spend_and_its_calls_in_flight(h):
    """A killed holder: its lease expires after the short TTL; what it spent plus what its calls in
    flight held at the last heartbeat is charged (they may have been billed), the rest comes back."""
    await h.stub.SetQuota(_quota(A, _tokens(1000)), metadata=h.op())
    lease = await _lease(h, 600)
    await _renew(h, lease.lease_id, spent=_usage(i=100, o=50), in_flight=120)
    h.clock.advance(5)
    status, _ = await _status(h)
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (0, 600)  # renewed: still held
    h.clock.advance(2)  # 7 s after the last heartbeat, TTL 6 s
    status, _ = await _status(h)  # status reads sweep expired holds first
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (270, 0)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the holder came back too late: nothing more on this lease
        await _renew(h, lease.lease_id, spent=_usage(i=200, o=50), in_flight=0)
    assert error_details(err.value)["reason"] == "LEASE_EXPIRED"


async def test_an_expiring_lease_never_charges_more_than_its_grant(h):
    """Spend plus in flight beyond the grant charges the grant: used + held stays within the budget."""
    await h.stub.SetQuota(_quota(A, _tokens(1000)), metadata=h.op())
    lease = await _lease(h, 300)
    await _renew(h, lease.lease_id, spent=_usage(o=250), in_flight=900)
    h.clock.advance(7)
    assert await h.service.sweeper.run_once() == 1
    status, _ = await _status(h)
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (300, 0)


async def test_a_release_charges_the_final_spend_not_what_was_in_flight(h):
    """A live holder's release gives the final spend: the last in-flight report is not charged."""
    await h.stub.SetQuota(_quota(A, _tokens(1000)), metadata=h.op())
    lease = await _lease(h, 600)
    await _renew(h, lease.lease_id, spent=_usage(i=100), in_flight=400)
    done = await h.stub.ReleaseLease(
        pb.ReleaseLeaseRequest(lease_id=lease.lease_id, spent=_usage(i=100, o=30)), metadata=h.md(A)
    )
    assert (done.charged.tokens, done.released.tokens) == (130, 470)
    h.clock.advance(60)
    status, _ = await _status(h)
    assert (status[pb.BUDGET_UNIT_TOKENS].used, status[pb.BUDGET_UNIT_TOKENS].held) == (130, 0)


async def test_in_flight_tokens_of_an_expired_lease_are_priced_at_its_dearest_rate(h):
    """On a money budget the in-flight tokens (kinds unknown) cost the lease's highest rate, rounded up,
    within what the lease holds in micro-USD."""
    await h.stub.SetPrice(
        pb.SetPriceRequest(price=price(MODEL, T0 - 1, 3_000_000, 15_000_000, 3_750_000, 300_000)), metadata=h.op()
    )
    await h.stub.SetQuota(_quota(A, pb.Budget(unit=pb.BUDGET_UNIT_MICRO_USD, limit=100_000)), metadata=h.op())
    lease = await _lease(h, 1000)
    assert lease.granted.micro_usd == 15_000  # 1000 tokens at the 15 micro-USD output rate
    await _renew(h, lease.lease_id, spent=_usage(i=100, o=10), in_flight=201)
    h.clock.advance(7)
    status, _ = await _status(h)
    # spent: 100 * 3 + 10 * 15 = 450; in flight: 201 * 15 = 3015.
    assert (status[pb.BUDGET_UNIT_MICRO_USD].used, status[pb.BUDGET_UNIT_MICRO_USD].held) == (3465, 0)


async def test_another_tenant_cannot_renew_a_lease_or_see_its_holder(h):
    """B renewing A's lease id (with an in-flight report) is LEASE_NOT_FOUND, as for a random id, and
    A's lease keeps its report."""
    await h.stub.SetQuota(_quota(A, _tokens(1000)), metadata=h.op())
    lease = await _lease(h, 400)
    await _renew(h, lease.lease_id, spent=_usage(i=10), in_flight=50)
    replies = []
    for lease_id in (lease.lease_id, "lease_doesnotexist"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _renew(h, lease_id, spent=_usage(i=10), in_flight=400, tenant=B)
        replies.append((err.value.code(), error_details(err.value)["reason"], err.value.details()))
    assert replies[0] == replies[1] == (grpc.StatusCode.NOT_FOUND, "LEASE_NOT_FOUND", "lease not found")
    h.clock.advance(7)
    status, _ = await _status(h)
    assert status[pb.BUDGET_UNIT_TOKENS].used == 60  # A's 10 spent + 50 in flight, not B's 400


@pytest.mark.parametrize(
    "method, request_, field, reason",
    [
        ("LeaseBudget", pb.LeaseBudgetRequest(model=MODEL, tokens=5, holder="x" * 201), "holder", "INVALID_LEASE"),
        ("LeaseBudget", pb.LeaseBudgetRequest(model=MODEL, tokens=5, holder="proxy\n1"), "holder", "INVALID_LEASE"),
        ("LeaseBudget", pb.LeaseBudgetRequest(model=MODEL, tokens=5, holder="pröxy"), "holder", "INVALID_LEASE"),
        (
            "RenewLease",
            pb.RenewLeaseRequest(lease_id="lease_x", in_flight_tokens=-1),
            "in_flight_tokens",
            "INVALID_USAGE",
        ),
        (
            "RenewLease",
            pb.RenewLeaseRequest(lease_id="lease_x", in_flight_tokens=1_000_000_001),
            "in_flight_tokens",
            "INVALID_USAGE",
        ),
    ],
)
async def test_bad_holders_and_in_flight_reports_are_refused_precisely(metering, method, request_, field, reason):
    """A holder past 200 characters or not printable ASCII, or an in-flight count out of 0..10**9:
    INVALID_ARGUMENT naming the field, and nothing is held."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(metering.stub, method)(request_, metadata=metering.md(A))
    details = error_details(err.value)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (details["reason"], field in details["bad_request"]) == (reason, True)
    status, _ = await _status(metering)
    assert status[pb.BUDGET_UNIT_TOKENS].held == 0


async def test_a_holder_of_200_printable_characters_is_kept_whole(metering):
    """The longest holder allowed is stored and answered back unchanged."""
    await metering.stub.SetQuota(_quota(A, _tokens(1000)), metadata=metering.op())
    holder = ("host-a:1234:" + "~!" * 100)[:200]
    assert (await _lease(metering, 10, holder=holder)).holder == holder
