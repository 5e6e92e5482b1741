"""Channels spread calls over every replica and resend exactly the calls the protos mark idempotent."""

from __future__ import annotations

from collections import Counter

import grpc
import pytest

from bulkhead.metering.v1 import metering_pb2
from bulkhead.orchestrator.v1 import orchestrator_pb2
from bulkhead.state.v1 import state_pb2, state_pb2_grpc
from shared.client import make_channel
from shared.service_config import channel_target, retryable_methods, service_config


def _names(methods) -> set[str]:
    return {f"{m.containing_service.name}.{m.name}" for m in methods}


def test_retry_list_comes_from_the_protos_idempotency_level():
    """Reads and writes idempotent by key are listed; writes a repeat would do twice are not."""
    names = _names(retryable_methods())
    assert {
        "StateService.ReadEvents",
        "StateService.Replay",
        "MeteringService.RecordUsage",
        "MeteringService.CommitBudget",
        "OrchestratorService.GetRun",
        "CredentialsService.GetSecret",
    } <= names
    assert not names & {
        "StateService.AppendEvents",
        "StateService.PutContext",
        "OrchestratorService.StartRun",
        "InferenceService.CreateMessage",
        "CredentialsService.PutSecret",
        "MeteringService.ReserveBudget",
        "MeteringService.LeaseBudget",
    }
    # Only from the descriptors given: one file's methods, nothing invented.
    only = _names(retryable_methods([metering_pb2.DESCRIPTOR, orchestrator_pb2.DESCRIPTOR]))
    assert only and all(n.split(".")[0] in ("MeteringService", "OrchestratorService") for n in only)


def test_service_config_is_round_robin_with_unavailable_only_retries():
    """One method config, retrying UNAVAILABLE alone with bounded attempts (the tests below show grpc applies it)."""
    config = service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method_config,) = config["methodConfig"]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= method_config["retryPolicy"]["maxAttempts"] <= 5


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1:5", "127.0.0.1:5"),
        ("127.0.0.1:5, 127.0.0.1:6", "ipv4:127.0.0.1:5,127.0.0.1:6"),
        ("[::1]:5,[::1]:6", "ipv6:[::1]:5,[::1]:6"),
        ("dns:///state.bulkhead:50053", "dns:///state.bulkhead:50053"),
        ("ipv4:127.0.0.1:5,127.0.0.1:6", "ipv4:127.0.0.1:5,127.0.0.1:6"),
    ],
)
def test_channel_target_from_address(address, target):
    """A list of replicas becomes one multi-address target; single addresses and URIs pass unchanged."""
    assert channel_target(address) == target


def test_a_list_of_host_names_is_refused_with_advice():
    """grpc has no target for several host names: say to use one DNS name instead of silently using one."""
    with pytest.raises(ValueError, match="dns:///"):
        channel_target("state-a:50053,state-b:50053")


class _Flaky(state_pb2_grpc.StateServiceServicer):
    """Answers reads and appends; the first `fail` calls of each method fail with UNAVAILABLE."""

    def __init__(self, name: str, calls: Counter, fail: int = 0):
        self.name, self.calls, self.fail = name, calls, fail

    async def _answer(self, method: str, context, response):
        self.calls[(self.name, method)] += 1
        if self.calls[(self.name, method)] <= self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        return response

    async def GetThread(self, request, context):
        return await self._answer("GetThread", context, state_pb2.GetThreadResponse())

    async def ReadEvents(self, request, context):
        return await self._answer("ReadEvents", context, state_pb2.ReadEventsResponse())

    async def AppendEvents(self, request, context):
        return await self._answer("AppendEvents", context, state_pb2.AppendEventsResponse())


async def _server(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    state_pb2_grpc.add_StateServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_idempotent_calls_are_resent_and_the_others_are_not():
    """ReadEvents that meets UNAVAILABLE is resent and succeeds; AppendEvents is sent once and fails."""
    calls: Counter = Counter()
    server, address = await _server(_Flaky("a", calls, fail=1))
    try:
        async with make_channel(address, tls=None) as channel:
            stub = state_pb2_grpc.StateServiceStub(channel)
            await stub.ReadEvents(state_pb2.ReadEventsRequest(thread_id="th"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.AppendEvents(state_pb2.AppendEventsRequest(thread_id="th"), timeout=10)
    finally:
        await server.stop(0)
    assert calls[("a", "ReadEvents")] == 2
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and calls[("a", "AppendEvents")] == 1


async def test_calls_spread_over_replicas_and_survive_one_stopping():
    """A two-address target sends calls to both servers; after one stops, every read still succeeds."""
    calls: Counter = Counter()
    (a, addr_a), (b, addr_b) = await _server(_Flaky("a", calls)), await _server(_Flaky("b", calls))
    try:
        async with make_channel(f"{addr_a},{addr_b}", tls=None) as channel:
            stub = state_pb2_grpc.StateServiceStub(channel)
            for _ in range(20):
                await stub.GetThread(state_pb2.GetThreadRequest(thread_id="th"), timeout=10)
            assert calls[("a", "GetThread")] >= 5 and calls[("b", "GetThread")] >= 5, calls
            await a.stop(0)
            for _ in range(20):
                await stub.ReadEvents(state_pb2.ReadEventsRequest(thread_id="th"), timeout=10)
            assert calls[("b", "ReadEvents")] == 20
    finally:
        await a.stop(0)
        await b.stop(0)
