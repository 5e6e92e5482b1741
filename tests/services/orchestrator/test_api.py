"""The orchestrator's RPCs through a real server: teams, runs, validation and tenant isolation."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb
from shared.errors import error_details

from .mesh import TIERS, team_pb

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def expect(code: grpc.StatusCode, call) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return error_details(info.value)


async def test_team_crud_round_trip(bare_mesh):
    """Create, get, list, update (masked, etag-checked) and delete a team."""
    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    created = (await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)).team
    assert created.etag and [ag.name for ag in created.agents] == ["triage", "billing"]
    got = (await stub.GetTeam(pb.GetTeamRequest(name="support"), metadata=a.metadata)).team
    assert got.http_tools[0].headers["authorization"] == "Bearer ${secret:billing_api_key}"
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb("alpha")), metadata=a.metadata)
    page1 = await stub.ListTeams(pb.ListTeamsRequest(page_size=1), metadata=a.metadata)
    page2 = await stub.ListTeams(
        pb.ListTeamsRequest(page_size=1, page_token=page1.next_page_token), metadata=a.metadata
    )
    assert [t.name for t in [*page1.teams, *page2.teams]] == ["alpha", "support"] and not page2.next_page_token
    change = pb.Team(name="support", description="new words", etag=created.etag)
    updated = (
        await stub.UpdateTeam(
            pb.UpdateTeamRequest(team=change, update_mask=field_mask_pb2.FieldMask(paths=["description"])),
            metadata=a.metadata,
        )
    ).team
    assert updated.description == "new words" and len(updated.agents) == 2 and updated.etag != created.etag
    stale = await expect(
        grpc.StatusCode.ABORTED,
        stub.UpdateTeam(
            pb.UpdateTeamRequest(team=change, update_mask=field_mask_pb2.FieldMask(paths=["description"])),
            metadata=a.metadata,
        ),
    )
    assert stale["reason"] == "ETAG_MISMATCH"
    await stub.DeleteTeam(pb.DeleteTeamRequest(name="support"), metadata=a.metadata)
    await expect(grpc.StatusCode.NOT_FOUND, stub.GetTeam(pb.GetTeamRequest(name="support"), metadata=a.metadata))


async def test_team_bad_input_is_precise_and_writes_nothing(bare_mesh):
    """Invalid teams get INVALID_ARGUMENT with field violations; duplicates ALREADY_EXISTS."""
    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    bad = team_pb()
    bad.agents[0].handoffs.append("ghost")
    bad.allowed_hosts[:] = ["example.com"]
    d = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, stub.CreateTeam(pb.CreateTeamRequest(team=bad), metadata=a.metadata)
    )
    assert d["reason"] == "INVALID_TEAM"
    assert {"team.agents[0].handoffs[1]", "team.http_tools[0].url"} <= set(d["bad_request"])
    assert not (await stub.ListTeams(pb.ListTeamsRequest(), metadata=a.metadata)).teams
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    d = await expect(
        grpc.StatusCode.ALREADY_EXISTS, stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    )
    assert d["reason"] == "TEAM_EXISTS"
    d = await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.ListTeams(pb.ListTeamsRequest(page_token="garbage!"), metadata=a.metadata),
    )
    assert d["reason"] == "INVALID_PAGE_TOKEN"
    d = await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UpdateTeam(
            pb.UpdateTeamRequest(team=pb.Team(name="support"), update_mask=field_mask_pb2.FieldMask(paths=["etag"])),
            metadata=a.metadata,
        ),
    )
    assert "update_mask" in d["bad_request"]


@pytest.mark.parametrize("number", [float("inf"), float("-inf"), float("nan")])
async def test_a_tool_schema_with_a_number_json_cannot_hold_is_invalid_argument(bare_mesh, number):
    """Infinity or NaN in a tool's JSON Schema is the caller's error, refused by the interceptor (it was INTERNAL)."""
    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    bad = team_pb("numbers")
    bad.http_tools[0].input_schema.update({"type": "object", "properties": {"n": {"maximum": 1}}})
    bad.http_tools[0].input_schema["properties"]["n"]["maximum"] = number
    for call in (
        stub.CreateTeam(pb.CreateTeamRequest(team=bad), metadata=a.metadata),
        stub.UpdateTeam(
            pb.UpdateTeamRequest(team=bad, update_mask=field_mask_pb2.FieldMask(paths=["http_tools"])),
            metadata=a.metadata,
        ),
    ):
        d = await expect(grpc.StatusCode.INVALID_ARGUMENT, call)
        assert d["reason"] == "VALUE_OUT_OF_RANGE"
        (field,) = d["bad_request"]
        assert field.startswith("team.http_tools[0].input_schema.") and field.endswith("number_value"), field
    assert not (await stub.ListTeams(pb.ListTeamsRequest(), metadata=a.metadata)).teams


async def test_teams_are_invisible_across_tenants(bare_mesh):
    """Tenant B cannot get, list, update, delete or run A's team; same names do not collide."""
    stub, a, b = bare_mesh.stub, await bare_mesh.tenant(), await bare_mesh.tenant()
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    for call in (
        stub.GetTeam(pb.GetTeamRequest(name="support"), metadata=b.metadata),
        stub.UpdateTeam(pb.UpdateTeamRequest(team=team_pb()), metadata=b.metadata),
        stub.DeleteTeam(pb.DeleteTeamRequest(name="support"), metadata=b.metadata),
        stub.StartRun(pb.StartRunRequest(team="support", input="hi"), metadata=b.metadata),
    ):
        assert (await expect(grpc.StatusCode.NOT_FOUND, call))["reason"] == "TEAM_NOT_FOUND"
    assert not (await stub.ListTeams(pb.ListTeamsRequest(), metadata=b.metadata)).teams
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=b.metadata)  # B's own "support"
    assert (
        await stub.GetTeam(pb.GetTeamRequest(name="support"), metadata=a.metadata)
    ).team.description == "support desk"


async def test_runs_are_invisible_across_tenants(bare_mesh):
    """B cannot get, watch or cancel A's run, and never sees it listed."""
    stub, a, b = bare_mesh.stub, await bare_mesh.tenant(), await bare_mesh.tenant()
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    run = (await stub.StartRun(pb.StartRunRequest(team="support", input="hello"), metadata=a.metadata)).run
    for call in (
        stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=b.metadata),
        stub.CancelRun(pb.CancelRunRequest(run_id=run.run_id), metadata=b.metadata),
    ):
        assert (await expect(grpc.StatusCode.NOT_FOUND, call))["reason"] == "RUN_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.WatchRun(pb.WatchRunRequest(run_id=run.run_id), metadata=b.metadata):
            pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (await stub.ListRuns(pb.ListRunsRequest(), metadata=b.metadata)).runs
    assert (
        await stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=a.metadata)
    ).run.status == pb.RUN_STATUS_QUEUED


async def test_start_run_validation_and_idempotency(bare_mesh):
    """Bad run requests are refused precisely; the same idempotency key returns the same run."""
    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    d = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, stub.StartRun(pb.StartRunRequest(team="support"), metadata=a.metadata)
    )
    assert "input" in d["bad_request"]
    d = await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.StartRun(pb.StartRunRequest(team="support", entry_agent="nobody", input="x"), metadata=a.metadata),
    )
    assert d["reason"] == "UNKNOWN_AGENT"
    assert not (await stub.ListRuns(pb.ListRunsRequest(), metadata=a.metadata)).runs
    first = (
        await stub.StartRun(pb.StartRunRequest(team="support", input="x", idempotency_key="k1"), metadata=a.metadata)
    ).run
    again = (
        await stub.StartRun(pb.StartRunRequest(team="support", input="x", idempotency_key="k1"), metadata=a.metadata)
    ).run
    assert first.run_id == again.run_id and first.entry_agent == "triage"
    runs = (await stub.ListRuns(pb.ListRunsRequest(team="support"), metadata=a.metadata)).runs
    assert [r.run_id for r in runs] == [first.run_id]


async def test_list_runs_filters_and_pages(bare_mesh):
    """ListRuns pages newest first and filters by status and team."""
    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    ids = [
        (await stub.StartRun(pb.StartRunRequest(team="support", input=f"q{i}"), metadata=a.metadata)).run.run_id
        for i in range(3)
    ]
    await stub.CancelRun(pb.CancelRunRequest(run_id=ids[0]), metadata=a.metadata)
    seen, token = [], ""
    while True:
        page = await stub.ListRuns(pb.ListRunsRequest(page_size=2, page_token=token), metadata=a.metadata)
        seen += [r.run_id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1]
    assert not (await stub.ListRuns(pb.ListRunsRequest(team="other"), metadata=a.metadata)).runs


async def test_cancel_queued_run(bare_mesh):
    """A queued run cancels at once; cancelling again is a no-op; WatchRun then ends."""
    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    run = (await stub.StartRun(pb.StartRunRequest(team="support", input="x"), metadata=a.metadata)).run
    assert run.status == pb.RUN_STATUS_QUEUED
    cancelled = (await stub.CancelRun(pb.CancelRunRequest(run_id=run.run_id), metadata=a.metadata)).run
    assert cancelled.status == pb.RUN_STATUS_CANCELLED
    got = (await stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=a.metadata)).run
    assert got.status == pb.RUN_STATUS_CANCELLED
    again = (await stub.CancelRun(pb.CancelRunRequest(run_id=run.run_id), metadata=a.metadata)).run
    assert again.status == pb.RUN_STATUS_CANCELLED
    [_ async for _ in stub.WatchRun(pb.WatchRunRequest(run_id=run.run_id), metadata=a.metadata)]


async def test_scopes_are_enforced(bare_mesh):
    """A token without orchestrator scopes is refused by the interceptor."""
    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    narrow = await bare_mesh.identity.login(a.api_key, scopes=("orchestrator.teams.read",))
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=narrow.metadata),
    )
    await stub.ListTeams(pb.ListTeamsRequest(), metadata=narrow.metadata)


async def test_concurrent_starts_with_one_key_make_one_run(bare_mesh):
    """Five simultaneous StartRun calls with the same idempotency key return one run."""
    import asyncio

    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=a.metadata)
    runs = await asyncio.gather(
        *(
            stub.StartRun(pb.StartRunRequest(team="support", input="x", idempotency_key="same"), metadata=a.metadata)
            for _ in range(5)
        )
    )
    assert len({r.run.run_id for r in runs}) == 1
    assert len((await stub.ListRuns(pb.ListRunsRequest(), metadata=a.metadata)).runs) == 1


@pytest.mark.parametrize("tier", list(TIERS))
async def test_queued_run_tells_its_place_in_its_own_tenants_queue(tier, bare_mesh):
    """StartRun and GetRun say where a queued run waits and the tenant's limit; other tenants' runs never count."""
    stub, a, b = bare_mesh.stub, await bare_mesh.tenant(tier), await bare_mesh.tenant(tier)
    for t in (a, b):
        await stub.CreateTeam(pb.CreateTeamRequest(team=team_pb()), metadata=t.metadata)
    started = [
        await stub.StartRun(pb.StartRunRequest(team="support", input=f"a{i}"), metadata=a.metadata) for i in range(3)
    ]
    assert [(s.queue.position, s.queue.running, s.queue.limit) for s in started] == [(1, 0, 4), (2, 0, 4), (3, 0, 4)]
    # B's first run is first in B's queue, however long A's is.
    b_run = await stub.StartRun(pb.StartRunRequest(team="support", input="b"), metadata=b.metadata)
    assert b_run.queue.position == 1
    got = await stub.GetRun(pb.GetRunRequest(run_id=started[2].run.run_id), metadata=a.metadata)
    assert got.run.status == pb.RUN_STATUS_QUEUED and got.queue.position == 3
    await stub.CancelRun(pb.CancelRunRequest(run_id=started[0].run.run_id), metadata=a.metadata)
    assert (await stub.GetRun(pb.GetRunRequest(run_id=started[2].run.run_id), metadata=a.metadata)).queue.position == 2
    # A run that no longer waits has no place.
    cancelled = await stub.GetRun(pb.GetRunRequest(run_id=started[0].run.run_id), metadata=a.metadata)
    assert cancelled.run.status == pb.RUN_STATUS_CANCELLED and not cancelled.HasField("queue")
    # B asking about A's queued run learns nothing, not even that it waits.
    d = await expect(
        grpc.StatusCode.NOT_FOUND, stub.GetRun(pb.GetRunRequest(run_id=started[1].run.run_id), metadata=b.metadata)
    )
    assert d["reason"] == "RUN_NOT_FOUND"


async def test_get_run_bad_input_is_precise(bare_mesh):
    """GetRun without a run id, or with an overlong one, is INVALID_ARGUMENT naming run_id."""
    stub, a = bare_mesh.stub, await bare_mesh.tenant()
    for run_id in ("", "r_" + "0" * 200):
        d = await expect(
            grpc.StatusCode.INVALID_ARGUMENT, stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=a.metadata)
        )
        assert "run_id" in d["bad_request"]
    d = await expect(grpc.StatusCode.NOT_FOUND, stub.GetRun(pb.GetRunRequest(run_id="r_missing"), metadata=a.metadata))
    assert d["reason"] == "RUN_NOT_FOUND"
