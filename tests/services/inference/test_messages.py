"""CreateMessage and StreamMessage return what the upstream sent, field for field, through the real SDK."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from bulkhead.inference.v1 import inference_pb2 as pb
from shared.errors import error_details
from testkit.fake_anthropic import Reply

from .helpers import MODEL, PINNED, PLATFORM_KEY, params, user

RICH = Reply(
    content=(
        {"type": "text", "text": "Let me look that up."},
        {
            "type": "tool_use",
            "id": "toolu_01",
            "name": "get_weather",
            "input": {"city": "Oslo", "days": 3, "units": {"temp": "C"}, "tags": ["a", "b"]},
        },
    ),
    stop_reason="tool_use",
    usage={"input_tokens": 11, "output_tokens": 17, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 7},
    model=PINNED,
)


def _rich_params() -> pb.MessageParams:
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    tool_input = struct_pb2.Struct()
    tool_input.update({"q": "earlier"})
    return pb.MessageParams(
        model=MODEL,
        max_tokens=200,
        temperature=0.2,
        top_p=0.9,
        top_k=5,
        stop_sequences=["STOP"],
        system=[pb.TextBlock(text="You are terse.", cache_control=pb.CacheControl(type="ephemeral"))],
        tools=[pb.Tool(name="get_weather", description="Weather by city", input_schema=schema)],
        tool_choice=pb.ToolChoice(type=pb.TOOL_CHOICE_TYPE_AUTO, disable_parallel_tool_use=True),
        messages=[
            user("What's the weather?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                content=[
                    pb.ContentBlock(tool_use=pb.ToolUseBlock(id="toolu_00", name="get_weather", input=tool_input))
                ],
            ),
            pb.Message(
                role=pb.ROLE_USER,
                content=[
                    pb.ContentBlock(
                        tool_result=pb.ToolResultBlock(
                            tool_use_id="toolu_00", content=[pb.ContentBlock(text=pb.TextBlock(text="rainy"))]
                        )
                    ),
                    pb.ContentBlock(image=pb.ImageBlock(data=b"\x89PNG", media_type="image/png")),
                ],
            ),
        ],
    )


async def test_unary_reply_equals_upstream_field_for_field(mesh):
    """Every field of the upstream's reply (text, tool_use input, stop reason, all usage) comes back unchanged."""
    mesh.fake.script(RICH)
    resp = await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=_rich_params()), metadata=mesh.md("t_a"))
    sent = mesh.fake.replies[-1]
    assert resp.id == sent["id"] and resp.model == PINNED and resp.role == pb.ROLE_ASSISTANT
    assert resp.content[0].text.text == "Let me look that up."
    tool = resp.content[1].tool_use
    assert (tool.id, tool.name) == ("toolu_01", "get_weather")
    assert json_format.MessageToDict(tool.input) == sent["content"][1]["input"]
    assert resp.stop_reason == pb.STOP_REASON_TOOL_USE and resp.stop_sequence == ""
    assert (
        resp.usage.input_tokens,
        resp.usage.output_tokens,
        resp.usage.cache_creation_input_tokens,
        resp.usage.cache_read_input_tokens,
    ) == (11, 17, 5, 7)
    assert resp.call.resolved_model == PINNED and resp.call.requested_model == MODEL
    assert resp.call.provider == "anthropic" and not resp.call.tenant_key and resp.call.request_id


async def test_request_reaches_upstream_faithfully(mesh):
    """The upstream receives the request as the Messages API spells it, with the pinned model."""
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=_rich_params()), metadata=mesh.md("t_a"))
    body = mesh.fake.calls[-1].body
    assert body["model"] == PINNED and body["max_tokens"] == 200
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["top_k"] == 5
    assert body["stop_sequences"] == ["STOP"]
    # On the platform key a cached prompt starts with the tenant's cache partition (test_prompt_cache.py).
    assert body["system"] == [
        {"type": "text", "text": mesh.proxy.proxy.cache_partition("t_a")},
        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
    ]
    assert body["tools"][0]["input_schema"]["required"] == ["city"]
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert body["messages"][1]["content"][0] == {
        "type": "tool_use",
        "id": "toolu_00",
        "name": "get_weather",
        "input": {"q": "earlier"},
    }
    result, image = body["messages"][2]["content"]
    assert result == {"type": "tool_result", "tool_use_id": "toolu_00", "content": [{"type": "text", "text": "rainy"}]}
    assert image["source"] == {"type": "base64", "media_type": "image/png", "data": "iVBORw=="}
    assert mesh.fake.calls[-1].headers["authorization"] == f"Bearer {PLATFORM_KEY}"


async def test_tenant_goes_upstream_only_as_opaque_id(mesh):
    """metadata.user_id is a stable opaque id: never the tenant id, the same for the same tenant."""
    for _ in range(2):
        await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_acme"))
    await mesh.stub.CreateMessage(pb.CreateMessageRequest(params=params()), metadata=mesh.md("t_other"))
    ids = [c.body["metadata"]["user_id"] for c in mesh.fake.calls]
    assert ids[0] == ids[1] != ids[2]
    raw = json.dumps([c.body for c in mesh.fake.calls]) + json.dumps([c.headers for c in mesh.fake.calls])
    assert "t_acme" not in raw and "acme" not in raw and "t_other" not in raw


async def test_stream_events_equal_upstream_events(mesh):
    """StreamMessage yields the upstream's events in order, with the same deltas, indices, stop reason and usage."""
    mesh.fake.script(RICH)
    events = [
        e
        async for e in mesh.stub.StreamMessage(pb.StreamMessageRequest(params=_rich_params()), metadata=mesh.md("t_a"))
    ]
    sent = [e for e in mesh.fake.sent_events[-1] if e["type"] != "ping"]
    got = [e for e in events if e.WhichOneof("event") != "ping"]
    assert [e.WhichOneof("event") for e in got] == [e["type"] for e in sent]
    for mine, theirs in zip(got, sent, strict=True):
        kind = theirs["type"]
        if kind == "content_block_delta":
            d = mine.content_block_delta
            assert d.index == theirs["index"]
            assert (d.text or d.partial_json) == (theirs["delta"].get("text") or theirs["delta"].get("partial_json"))
        elif kind == "content_block_start":
            assert mine.content_block_start.index == theirs["index"]
        elif kind == "message_delta":
            assert mine.message_delta.stop_reason == pb.STOP_REASON_TOOL_USE
            assert mine.message_delta.usage.output_tokens == theirs["usage"]["output_tokens"] == 17
        elif kind == "message_start":
            m = mine.message_start.message
            assert m.id == theirs["message"]["id"] and m.model == PINNED
            assert (m.usage.input_tokens, m.usage.cache_creation_input_tokens, m.usage.cache_read_input_tokens) == (
                11,
                5,
                7,
            )
    assert events[0].call.resolved_model == PINNED and not events[1].HasField("call")
    joined = "".join(e.content_block_delta.partial_json for e in got if e.HasField("content_block_delta"))
    assert json.loads(joined) == RICH.content[1]["input"]


async def test_count_tokens_uses_upstream_count(mesh):
    """CountTokens returns the upstream's count for the pinned model, and makes no model call."""
    resp = await mesh.stub.CountTokens(pb.CountTokensRequest(params=params("one two three")), metadata=mesh.md("t_a"))
    assert resp.input_tokens == 3 and resp.resolved_model == PINNED
    assert mesh.fake.request_count == 0


@pytest.mark.parametrize(
    "bad, field, reason",
    [
        (pb.MessageParams(model=MODEL, max_tokens=10), "params.messages", "MESSAGES_REQUIRED"),
        (pb.MessageParams(model=MODEL, max_tokens=0, messages=[user("x")]), "params.max_tokens", "INVALID_MAX_TOKENS"),
        (
            pb.MessageParams(model=MODEL, max_tokens=5000, messages=[user("x")]),
            "params.max_tokens",
            "MAX_TOKENS_ABOVE_CEILING",
        ),
        (
            pb.MessageParams(
                model=MODEL,
                max_tokens=10,
                messages=[pb.Message(content=[pb.ContentBlock(text=pb.TextBlock(text="x"))])],
            ),
            "params.messages[0].role",
            "INVALID_MESSAGE",
        ),
        (
            pb.MessageParams(
                model=MODEL,
                max_tokens=10,
                messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(image=pb.ImageBlock(data=b"x"))])],
            ),
            "params.messages[0].content[0].image.media_type",
            "INVALID_MESSAGE",
        ),
    ],
)
async def test_bad_input_is_refused_before_upstream(mesh, bad, field, reason):
    """Malformed requests get INVALID_ARGUMENT with the field and reason, and never reach the upstream."""
    for call in (
        mesh.stub.CreateMessage(pb.CreateMessageRequest(params=bad), metadata=mesh.md("t_a")),
        _first(mesh.stub.StreamMessage(pb.StreamMessageRequest(params=bad), metadata=mesh.md("t_a"))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error_details(info.value)
        assert details["reason"] == reason and field in details["bad_request"]
    assert mesh.fake.request_count == 0


async def _first(stream):
    async for event in stream:
        return event


async def test_long_input_is_not_echoed_into_error_metadata(mesh):
    """StreamMessage with 5,000-character strings fails with a bounded error, not a metadata-size failure."""
    long = "m" * 5000
    bad = pb.StreamMessageRequest(
        params=pb.MessageParams(model=long, messages=[user(long)], max_tokens=10, system=[pb.TextBlock(text=long)])
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in mesh.stub.StreamMessage(bad, metadata=mesh.md("t_a")):
            pass
    # An unknown model is a policy refusal; what matters is that the reply says so within bounds.
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
    details = dict(caught.value.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
    assert 0 < len(details) <= 1024
    assert len(caught.value.details()) <= 400
