"""Pluggable rotators: an integration's rotator is used for its secrets."""

from __future__ import annotations

from bulkhead.credentials.v1 import credentials_pb2 as pb
from services.credentials.rotation import (
    RandomRotator,
    RotationRequest,
    RotatorRegistry,
)
from tests.services.credentials.conftest import start_harness, stop_harness


class CountingRotator:
    """A stand-in for a provider integration: it is told which secret, never the old value."""

    name = "counting"

    def __init__(self) -> None:
        self.requests: list[RotationRequest] = []

    async def new_value(self, request: RotationRequest) -> bytes:
        self.requests.append(request)
        return f"issued-{len(self.requests)}".encode()


async def test_a_registered_rotator_makes_the_new_value(tmp_path, migrated_template):
    """RotateSecret on a secret with rotator=counting stores what that rotator returned."""
    rotator = CountingRotator()
    h = await start_harness("local", tmp_path, migrated_template, rotators=RotatorRegistry([RandomRotator(), rotator]))
    try:
        await h.put("provider-key", b"initial-value", rotator="counting")
        rotated = (await h.stub.RotateSecret(pb.RotateSecretRequest(name="provider-key"), metadata=h.md())).secret
        assert rotated.current_version == 2 and rotated.rotator == "counting"
        assert (await h.get("provider-key")).value == b"issued-1"
        assert [(r.tenant_id, r.secret_name, r.current_version) for r in rotator.requests] == [
            (h.alpha, "provider-key", 1)
        ]
    finally:
        await stop_harness(h)


async def test_random_rotator_values_differ():
    """The built-in rotator never repeats itself."""
    rotator = RandomRotator()
    request = RotationRequest("t_x", "k", 1)
    assert len({await rotator.new_value(request) for _ in range(20)}) == 20
