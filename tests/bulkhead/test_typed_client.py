"""The client's stub properties carry the generated async stubs' types, so mypy checks every call made through them."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

from bulkhead.client import Client

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent

SAMPLE = """
from bulkhead.client import Client
from bulkhead.identity.v1 import identity_pb2
from bulkhead.state.v1 import state_pb2


async def right(bh: Client) -> str:
    reply = await bh.identity.GetTenant(identity_pb2.GetTenantRequest())
    thread = await bh.state.GetThread(state_pb2.GetThreadRequest(thread_id="t"))
    return reply.tenant.id + thread.thread.thread_id


async def wrong_request(bh: Client) -> None:
    await bh.identity.GetTenant(state_pb2.GetThreadRequest())  # error: another RPC's request


async def no_such_rpc(bh: Client) -> None:
    await bh.identity.GetThread(state_pb2.GetThreadRequest())  # error: identity has no GetThread


async def wrong_reply_field(bh: Client) -> str:
    reply = await bh.metering.GetQuotaStatus(None)  # error: a request is required
    return reply.no_such_field  # error: the reply has no such field
"""


def test_every_service_has_a_typed_stub_property() -> None:
    """identity, credentials, state, inference, orchestrator and metering are properties, not __getattr__ magic."""
    names = {"identity", "credentials", "state", "inference", "orchestrator", "metering"}
    assert names <= {n for n, v in vars(Client).items() if isinstance(v, property)}
    assert not hasattr(Client, "__getattr__")


@pytest.mark.slow
def test_mypy_rejects_wrong_calls_through_the_client(tmp_path: pathlib.Path) -> None:
    """A request of another RPC, an RPC the service lacks and a reply field that does not exist are type
    errors; the right calls are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(textwrap.dedent(SAMPLE))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".cache" / "mypy"),
            "--no-error-summary",
            str(sample),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    expected = [n for n, line in enumerate(sample.read_text().splitlines(), 1) if "# error" in line]
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert sorted({int(line.split(":")[1]) for line in errors}) == expected, done.stdout + done.stderr
    assert "GetTenantRequest" in next(e for e in errors if f":{expected[0]}:" in e)
    assert "GetThread" in next(e for e in errors if f":{expected[1]}:" in e)
