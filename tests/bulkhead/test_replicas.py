"""`bulkhead up --replicas N`: where each replica listens, what callers dial, what each replica is told."""

from __future__ import annotations

import pytest

from bulkhead_cli.supervisor import REPLICA_STRIDE, Supervisor
from shared.config import ServiceConfig, listen_addr

ENV = {
    "BULKHEAD_STATE_ADDR": "127.0.0.1:40053",
    "BULKHEAD_STATE_METRICS_PORT": "40153",
    "BULKHEAD_INFERENCE_ADDR": "127.0.0.1:40054",
    "BULKHEAD_INFERENCE_METRICS_PORT": "0",
}


def test_each_replica_gets_its_own_ports_and_callers_dial_them_all():
    """Replica i listens and serves metrics REPLICA_STRIDE*i further on; every process dials the list."""
    sup = Supervisor(["state", "inference"], ENV, replicas=3)
    state = [p for p in sup.procs.values() if p.name == "state"]
    assert [p.label for p in state] == ["state#1", "state#2", "state#3"]
    assert [p.address for p in state] == [f"127.0.0.1:{40053 + i * REPLICA_STRIDE}" for i in range(3)]
    assert [p.env["BULKHEAD_STATE_METRICS_PORT"] for p in state] == ["40153", "40163", "40173"]
    assert sup.env["BULKHEAD_STATE_ADDR"] == "ipv4:127.0.0.1:40053,127.0.0.1:40063,127.0.0.1:40073"
    # What one replica's process reads as its own config: it listens on its own port, dials all of state.
    cfg = ServiceConfig.from_env("state", {**sup.env, **state[1].env})
    assert cfg.address == "127.0.0.1:40063" and cfg.peer("state") == sup.env["BULKHEAD_STATE_ADDR"]
    # Metrics off stays off for every replica; inference replicas keep distinct, stable journal names.
    inference = [p for p in sup.procs.values() if p.name == "inference"]
    assert {p.env["BULKHEAD_INFERENCE_METRICS_PORT"] for p in inference} == {"0"}
    assert [p.env["BULKHEAD_INFERENCE_REPLICA_ID"] for p in inference] == ["inference-1", "inference-2", "inference-3"]
    assert [row[0] for row in sup.rows()] == [p.label for p in sup.procs.values()]


def test_one_replica_is_unchanged():
    """Without --replicas, names, addresses and environment are what they always were."""
    sup = Supervisor(["state"], ENV)
    assert list(sup.procs) == ["state"] and sup.procs["state"].env == {}
    assert sup.env["BULKHEAD_STATE_ADDR"] == "127.0.0.1:40053"


def test_a_service_given_several_addresses_must_be_told_where_to_listen():
    """A list is where callers dial; a process cannot listen on a list, and says which variable to set."""
    env = {"BULKHEAD_STATE_ADDR": "127.0.0.1:1,127.0.0.1:2"}
    with pytest.raises(ValueError, match="BULKHEAD_STATE_LISTEN_ADDR"):
        listen_addr("state", env)
    assert listen_addr("state", {**env, "BULKHEAD_STATE_LISTEN_ADDR": "127.0.0.1:2"}) == "127.0.0.1:2"


@pytest.mark.parametrize("replicas", [0, 9])
def test_replica_count_is_bounded(replicas):
    """Past MAX_REPLICAS the port layout would collide with other services' ports."""
    with pytest.raises(ValueError, match="replicas must be"):
        Supervisor(["state"], ENV, replicas=replicas)
