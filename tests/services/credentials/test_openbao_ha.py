"""Credentials on a 3-node OpenBao Raft cluster: the leader is killed (SIGKILL) mid-workload,
credentials keeps serving after the failover, and no acknowledged secret version is lost."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import grpc
import pytest

from bulkhead.credentials.v1 import credentials_pb2 as pb
from services.credentials.backend import TenantRef
from shared.errors import error_details
from tests.services.credentials.conftest import start_harness, stop_harness

pytestmark = pytest.mark.openbao

VERSIONS_PER_SECRET = 8  # KV v2 keeps 10 versions by default; older ones are pruned by OpenBao
MAX_GAP_S = 15.0  # Raft elects in ~2 s with performance_multiplier = 1; this bounds a hang


@dataclass(frozen=True)
class Writer:
    """One concurrent writer: whose secrets it writes, and their prefix."""

    tenant: str
    tier: str
    prefix: str


@dataclass
class Workload:
    """What the writers saw: acknowledged versions, refusals, and when."""

    acked: dict[tuple[Writer, str, int], bytes] = field(default_factory=dict)
    """(writer, secret name, version) -> value, for every PutSecret that returned OK."""
    unavailable: list[float] = field(default_factory=list)
    """When each UNAVAILABLE came back."""
    successes: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) of every successful PutSecret + GetSecret pair."""

    def first_success_after(self, moment: float) -> float | None:
        """End of the first success that STARTED after `moment` (calls in flight do not count)."""
        ends = [end for start, end in self.successes if start >= moment]
        return min(ends) if ends else None


async def _write_loop(h, w: Writer, work: Workload, stop: asyncio.Event) -> None:
    """PutSecret then GetSecret of that version, again and again; UNAVAILABLE is retried."""
    md = h.tokens.metadata(w.tenant, ("*",), tier=w.tier)
    n = 0
    while not stop.is_set():
        name = f"{w.prefix}-{n // VERSIONS_PER_SECRET}"
        value = f"{name}-{n}-{secrets.token_hex(4)}".encode()
        started = time.monotonic()
        try:
            put = await h.stub.PutSecret(pb.PutSecretRequest(name=name, value=value), metadata=md)
            version = put.secret.current_version
            work.acked[(w, name, version)] = value
            got = await h.stub.GetSecret(pb.GetSecretRequest(name=name, version=version), metadata=md)
            assert got.value == value, (w, name, version)
            work.successes.append((started, time.monotonic()))
            n += 1
        except grpc.aio.AioRpcError as err:
            # The only failure allowed is "retry later"; anything else is a bug the test must show.
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
            assert error_details(err)["reason"] == "SECRET_MANAGER_UNAVAILABLE"
            work.unavailable.append(time.monotonic())
            await asyncio.sleep(0.05)


async def _kill_leader_and_wait(cluster, work: Workload, tasks) -> tuple[object, object, float]:
    """SIGKILL the leader; wait for the first success that started after it. (killed, new, gap)"""
    leader = await asyncio.to_thread(cluster.wait_for_leader)
    killed_at = time.monotonic()
    await asyncio.to_thread(leader.kill)
    while (end := work.first_success_after(killed_at)) is None:
        assert time.monotonic() - killed_at < MAX_GAP_S, f"no success {MAX_GAP_S}s after the kill\n{cluster.logs()}"
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        await asyncio.sleep(0.01)
    new_leader = await asyncio.to_thread(cluster.wait_for_leader)
    assert new_leader is not leader
    return leader, new_leader, end - killed_at


async def _check_nothing_lost(h, cluster, work: Workload) -> None:
    """Every acknowledged version reads back, through credentials and in OpenBao's own KV v2."""
    layout = h.service.backend.layout
    leader = cluster.wait_for_leader()
    for (w, name, version), value in sorted(work.acked.items(), key=lambda kv: (kv[0][0].prefix, *kv[0][1:])):
        md = h.tokens.metadata(w.tenant, ("*",), tier=w.tier)
        got = await h.stub.GetSecret(pb.GetSecretRequest(name=name, version=version), metadata=md)
        assert got.value == value, (w, name, version)
        ref = TenantRef(w.tenant, w.tier)
        kv = cluster.client(url=leader.url, namespace=layout.namespace(ref))
        raw = kv.secrets.kv.v2.read_secret_version(
            layout.secret_path(ref, name), version=version, mount_point=layout.kv_mount, raise_on_deleted_version=True
        )
        assert base64.b64decode(raw["data"]["data"]["value"]) == value, (w, name, version)


async def _start(cluster, tmp_path, migrated_template):
    """Credentials given every node, the current leader first (the node it talks to dies first)."""
    leader = cluster.wait_for_leader()
    urls = [leader.url] + [u for u in cluster.urls if u != leader.url]
    h = await start_harness(
        "vault", tmp_path, migrated_template, SimpleNamespace(url=",".join(urls), root_token=cluster.root_token)
    )
    assert h.service.backend.current_address == leader.url
    # Pooled writers, and a silo tenant whose secrets live in an OpenBao namespace of its own.
    silo = "t_silo" + h.alpha[3:]
    writers = [Writer(h.alpha, "pooled", f"p{i}") for i in range(3)] + [Writer(silo, "silo", "s0")]
    return h, writers


async def test_credentials_keeps_serving_when_the_openbao_leader_is_killed(tmp_path, migrated_template, openbao_raft):
    """kill -9 of the leader mid-workload: writes pause for the election and resume; every
    acknowledged version is still readable, through credentials and in OpenBao itself."""
    cluster = openbao_raft
    h, writers = await _start(cluster, tmp_path, migrated_template)
    work, stop = Workload(), asyncio.Event()
    tasks = [asyncio.create_task(_write_loop(h, w, work, stop)) for w in writers]
    try:
        await asyncio.sleep(1.5)
        before = len(work.acked)
        killed, new_leader, gap = await _kill_leader_and_wait(cluster, work, tasks)
        at_recovery = len(work.acked)
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
        print(
            f"\nOpenBao leader {killed.node_id} killed; {new_leader.node_id} took over; first success "
            f"{gap * 1000:.0f} ms after the kill; {len(work.unavailable)} UNAVAILABLE meanwhile; "
            f"{before} versions acknowledged before, {len(work.acked) - before} after; "
            f"credentials now on {h.service.backend.current_address}"
        )
        assert h.service.backend.current_address != killed.url
        assert before > 0 and len(work.acked) > at_recovery, "the workload must write on both sides of the kill"
        assert {w for w, _, _ in work.acked} == set(writers), "every writer, the silo one too, must have written"
        await _check_nothing_lost(h, cluster, work)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stop_harness(h)


@pytest.mark.slow
async def test_two_leaders_killed_in_turn_with_the_first_back_in_between(tmp_path, migrated_template, openbao_raft):
    """Longer: kill the leader, bring it back (restarted and unsealed, it rejoins as a standby),
    then kill the next leader; credentials serves through both and loses nothing."""
    cluster = openbao_raft
    h, writers = await _start(cluster, tmp_path, migrated_template)
    work, stop = Workload(), asyncio.Event()
    tasks = [asyncio.create_task(_write_loop(h, w, work, stop)) for w in writers]
    try:
        gaps = []
        await asyncio.sleep(2)
        first, _, gap = await _kill_leader_and_wait(cluster, work, tasks)
        gaps.append(gap)
        await asyncio.sleep(2)
        # Restarted on this (pytest's) thread: the node must not die with a worker thread.
        cluster.restart(first)
        await asyncio.sleep(3)
        second, _, gap = await _kill_leader_and_wait(cluster, work, tasks)
        gaps.append(gap)
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*tasks)
        print(
            f"\nOpenBao leaders {first.node_id} then {second.node_id} killed; gaps "
            f"{', '.join(f'{g * 1000:.0f} ms' for g in gaps)}; {len(work.unavailable)} UNAVAILABLE; "
            f"{len(work.acked)} versions acknowledged"
        )
        await _check_nothing_lost(h, cluster, work)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stop_harness(h)


async def test_a_sealed_node_listed_first_is_passed_over(tmp_path, migrated_template, openbao_raft):
    """A node that restarted and is still sealed answers 503 to everything: credentials moves to
    the next address for that request and stays there, instead of failing every call."""
    cluster = openbao_raft
    sealed = next(n for n in cluster.nodes if n is not cluster.wait_for_leader())
    sealed.kill()
    sealed.start()  # comes back sealed: nobody unseals it
    assert sealed.health()["sealed"]
    urls = [sealed.url] + [u for u in cluster.urls if u != sealed.url]
    h = await start_harness(
        "vault", tmp_path, migrated_template, SimpleNamespace(url=",".join(urls), root_token=cluster.root_token)
    )
    try:
        for i in range(3):
            await h.put("k", f"value-{i}".encode())
            assert (await h.get("k")).value == f"value-{i}".encode()
        assert h.service.backend.current_address != sealed.url
    finally:
        await stop_harness(h)
