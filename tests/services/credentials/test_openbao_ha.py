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

WRITERS = 4
BEFORE_KILL_S = 1.5
AFTER_RECOVERY_S = 1.5
VERSIONS_PER_SECRET = 8  # KV v2 keeps 10 versions by default; older ones are pruned by OpenBao
MAX_GAP_S = 15.0  # Raft elects in ~2 s with performance_multiplier = 1; this bounds a hang


@dataclass
class Workload:
    """What the writers saw: acknowledged versions, refusals, and when."""

    acked: dict[tuple[str, int], bytes] = field(default_factory=dict)
    """(secret name, version) -> value, for every PutSecret that returned OK."""
    reads_ok: int = 0
    """GetSecrets that returned the value last written."""
    unavailable: list[float] = field(default_factory=list)
    """When each UNAVAILABLE came back."""
    successes: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) of every successful call."""


async def _writer(h, prefix: str, work: Workload, stop: asyncio.Event) -> None:
    """PutSecret then GetSecret of the same version, again and again; UNAVAILABLE is retried."""
    n = 0
    while not stop.is_set():
        name = f"{prefix}-{n // VERSIONS_PER_SECRET}"
        value = f"{name}-{n}-{secrets.token_hex(4)}".encode()
        started = time.monotonic()
        try:
            secret = await h.put(name, value)
            work.acked[(name, secret.current_version)] = value
            got = await h.get(name, version=secret.current_version)
            assert got.value == value, (name, secret.current_version)
            work.reads_ok += 1
            work.successes.append((started, time.monotonic()))
            n += 1
        except grpc.aio.AioRpcError as err:
            # The only failure allowed is "retry later"; anything else is a bug the test must show.
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
            assert error_details(err)["reason"] == "SECRET_MANAGER_UNAVAILABLE"
            work.unavailable.append(time.monotonic())
            await asyncio.sleep(0.05)


async def test_credentials_keeps_serving_when_the_openbao_leader_is_killed(tmp_path, migrated_template,
                                                                          openbao_raft):
    """kill -9 of the leader mid-workload: writes pause for the election and resume; every
    acknowledged version is still readable, through credentials and in OpenBao itself."""
    cluster = openbao_raft
    leader = cluster.wait_for_leader()
    # The leader first: credentials talks to the node that dies, the worst case.
    urls = [leader.url] + [u for u in cluster.urls if u != leader.url]
    target = SimpleNamespace(url=",".join(urls), root_token=cluster.root_token)
    h = await start_harness("vault", tmp_path, migrated_template, target)
    work, stop = Workload(), asyncio.Event()
    try:
        assert h.service.backend.current_address == leader.url
        tasks = [asyncio.create_task(_writer(h, f"ha-{i}", work, stop)) for i in range(WRITERS)]
        await asyncio.sleep(BEFORE_KILL_S)
        before = len(work.acked)
        killed_at = time.monotonic()
        await asyncio.to_thread(leader.kill)
        while not any(start >= killed_at for start, _ in work.successes):
            assert time.monotonic() - killed_at < MAX_GAP_S, f"no success {MAX_GAP_S}s after the kill\n{cluster.logs()}"
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            await asyncio.sleep(0.01)
        gap = min(end for start, end in work.successes if start >= killed_at) - killed_at
        new_leader = await asyncio.to_thread(cluster.wait_for_leader)
        at_recovery = len(work.acked)
        await asyncio.sleep(AFTER_RECOVERY_S)
        stop.set()
        await asyncio.gather(*tasks)

        print(f"\nOpenBao leader {leader.node_id} killed; {new_leader.node_id} took over; first success "
              f"{gap * 1000:.0f} ms after the kill; {len(work.unavailable)} UNAVAILABLE meanwhile; "
              f"{before} versions acknowledged before, {len(work.acked) - before} after; "
              f"credentials now on {h.service.backend.current_address}")
        assert new_leader is not leader and h.service.backend.current_address != leader.url
        assert before > 0 and len(work.acked) > at_recovery, "the workload must write on both sides of the kill"

        # No acknowledged version lost: each is readable through credentials ...
        for (name, version), value in sorted(work.acked.items()):
            got = await h.get(name, version=version)
            assert got.value == value, (name, version)
        # ... and present in OpenBao's own KV v2 history, read on the new leader.
        kv = cluster.client(url=new_leader.url)
        layout = h.service.backend.layout
        for (name, version), value in sorted(work.acked.items()):
            path = layout.secret_path(TenantRef(h.alpha, "pooled"), name)
            raw = kv.secrets.kv.v2.read_secret_version(path, version=version, mount_point=layout.kv_mount,
                                                       raise_on_deleted_version=True)
            assert base64.b64decode(raw["data"]["data"]["value"]) == value, (name, version)
    finally:
        stop.set()
        await stop_harness(h)
