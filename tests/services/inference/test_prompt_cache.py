"""On the platform's provider key, tenants' cached prompt prefixes never match: no cross-tenant cache hits.

The upstream's prompt cache is shared by everything sent with one key, and a hit shows (in latency
and in cache_read_input_tokens), which tells a tenant that another sent the same prefix. The fake
upstream simulates that cache per key, so these tests see hits and misses as a real key would.
"""

from __future__ import annotations

import json

import pytest
from google.protobuf import struct_pb2

from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference import wire
from testkit.fake_anthropic import cache_prefixes

from .helpers import PLATFORM_KEY

TENANT_KEY = "sk-ant-tenant-own-key-0123456789"
EPHEMERAL = pb.CacheControl(type="ephemeral")
HOUR = pb.CacheControl(type="ephemeral", ttl="1h")


def _cached_params(
    question: str = "What is the weather in Oslo today?",
    *,
    tool_cache: pb.CacheControl | None = HOUR,
    system_cache: pb.CacheControl | None = EPHEMERAL,
    message_cache: pb.CacheControl | None = EPHEMERAL,
) -> pb.MessageParams:
    """The same long, cacheable prompt any tenant could send: a tool, a system prompt, a first turn."""
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"city": {"type": "string"}}})
    tool = pb.Tool(name="get_weather", description="Weather for a city, today and the next days", input_schema=schema)
    if tool_cache is not None:
        tool.cache_control.CopyFrom(tool_cache)
    system = pb.TextBlock(text="You are the support assistant of the Oslo weather desk. " * 20)
    if system_cache is not None:
        system.cache_control.CopyFrom(system_cache)
    first = pb.TextBlock(text="Here is our internal runbook. " * 10)
    if message_cache is not None:
        first.cache_control.CopyFrom(message_cache)
    return pb.MessageParams(
        model="claude-test",
        max_tokens=50,
        tools=[tool],
        system=[system],
        messages=[
            pb.Message(
                role=pb.ROLE_USER,
                content=[pb.ContentBlock(text=first), pb.ContentBlock(text=pb.TextBlock(text=question))],
            )
        ],
    )


async def _call(mesh, tenant: str, params: pb.MessageParams, *, stream: bool) -> dict[str, int]:
    """Make one call; the usage the caller got back (as the upstream reported it)."""
    md = mesh.md(tenant)
    if stream:
        events = [e async for e in mesh.stub.StreamMessage(pb.StreamMessageRequest(params=params), metadata=md)]
        usage = events[0].message_start.message.usage
    else:
        usage = (await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params), metadata=md)).usage
    return {
        "read": usage.cache_read_input_tokens,
        "written": usage.cache_creation_input_tokens,
        "input": usage.input_tokens,
    }


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_two_tenants_with_the_same_cached_prompt_never_share_a_prefix(mesh, stream):
    """Every breakpoint's prefix differs between tenants, so the second tenant reads nothing the first cached."""
    first = await _call(mesh, "t_a", _cached_params(), stream=stream)
    second = await _call(mesh, "t_b", _cached_params(), stream=stream)
    a, b = (cache_prefixes(c.body) for c in mesh.fake.calls)
    assert len(a) == len(b) == 3  # tool, system and message breakpoints: none added, none lost
    assert not {digest for digest, _ in a} & {digest for digest, _ in b}
    assert first["read"] == 0 and first["written"] > 0
    assert second["read"] == 0 and second["written"] == first["written"]  # a miss: nothing to learn
    assert {c.headers["authorization"] for c in mesh.fake.calls} == {f"Bearer {PLATFORM_KEY}"}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_a_tenants_own_cache_still_hits(mesh, stream):
    """The same tenant sends the same prefix twice: byte for byte the same, and the second call reads the cache."""
    first = await _call(mesh, "t_a", _cached_params("first question?"), stream=stream)
    again = await _call(mesh, "t_a", _cached_params("a different question?"), stream=stream)
    one, two = (cache_prefixes(c.body) for c in mesh.fake.calls)
    assert one == two
    assert again["read"] == first["written"] > 0 and again["written"] == 0
    await mesh.settle()  # what the upstream reported (the marker's tokens included) is what was metered
    billed = [r.usage for r in mesh.fake.usage_log if r.user_id == mesh.proxy.proxy.opaque_user_id("t_a")]
    assert [(events, i, cache) for _, events, i, _, cache in await mesh.metered("t_a")] == [
        (
            2,
            sum(u["input_tokens"] for u in billed),
            sum(u["cache_read_input_tokens"] + u["cache_creation_input_tokens"] for u in billed),
        )
    ]


async def test_marker_is_a_keyed_hash_first_in_system_and_names_no_tenant(mesh):
    """The tenant block leads the system prompt, is the same for a tenant's calls, and carries no tenant id."""
    for tenant in ("t_acme", "t_acme", "t_other"):
        await _call(mesh, tenant, _cached_params(), stream=False)
    markers = [c.body["system"][0] for c in mesh.fake.calls]
    assert markers[0] == markers[1] != markers[2]
    assert markers[0]["text"] == mesh.proxy.proxy.cache_partition("t_acme")
    raw = json.dumps([c.body for c in mesh.fake.calls])
    assert "acme" not in raw and "t_other" not in raw
    assert mesh.fake.calls[0].body["system"][1]["text"].startswith("You are the support assistant")


async def test_tool_breakpoint_moves_onto_the_marker(mesh):
    """Tools come first in the cache prefix, before any system block: their breakpoint moves to the marker
    (keeping its TTL), which caches the tools and the marker together."""
    await _call(mesh, "t_a", _cached_params(system_cache=None, message_cache=None), stream=False)
    body = mesh.fake.calls[-1].body
    assert "cache_control" not in body["tools"][0]
    assert body["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert "cache_control" not in body["system"][1]
    assert len(cache_prefixes(body)) == 1


async def test_no_cache_control_no_marker(mesh):
    """A request that caches nothing goes upstream unchanged (no marker, no extra tokens)."""
    params = _cached_params(tool_cache=None, system_cache=None, message_cache=None)
    await _call(mesh, "t_a", params, stream=False)
    body = mesh.fake.calls[-1].body
    assert len(body["system"]) == 1 and body["system"][0]["text"].startswith("You are the support assistant")


async def test_tenants_own_key_sends_the_body_unchanged(mesh):
    """On its own key a tenant's cache is its own: the request goes exactly as built, breakpoints in place."""
    await mesh.put_tenant_key("t_a", TENANT_KEY)
    await _call(mesh, "t_a", _cached_params(), stream=False)
    call = mesh.fake.calls[-1]
    assert call.headers["authorization"] == f"Bearer {TENANT_KEY}"
    expected = wire.params_to_json(_cached_params(), model=call.body["model"], max_tokens=50)
    assert {k: v for k, v in call.body.items() if k != "metadata"} == expected


def test_partition_covers_every_kind_of_breakpoint() -> None:
    """Breakpoints on a tool result, an image, the top level (automatic caching) all get a per-caller prefix."""
    base = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "x",
                        "content": [{"type": "text", "text": "r"}],
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
            }
        ],
    }
    image = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://x/y.png"},
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
            }
        ],
    }
    automatic = {
        "model": "m",
        "max_tokens": 5,
        "cache_control": {"type": "ephemeral"},
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "hi"}],
    }
    for body in (base, image, automatic):
        pa, pb_ = (cache_prefixes(wire.partition_prompt_cache(body, f"cache-partition:{t}")) for t in "ab")
        assert pa and len(pa) == len(pb_) and not {d for d, _ in pa} & {d for d, _ in pb_}
    assert wire.partition_prompt_cache(automatic, "m")["system"][1] == {"type": "text", "text": "Be brief."}
