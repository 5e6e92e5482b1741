"""The offline provider: the embedded default without ANTHROPIC_API_KEY, deterministic and metered like any other."""

from __future__ import annotations

import pytest

from bulkhead.inference.v1 import inference_pb2 as pb
from services.inference.config import InferenceConfig
from services.inference.providers import ANTHROPIC, OFFLINE

from .helpers import PINNED, params


def test_provider_defaults_to_offline_without_a_key():
    """No ANTHROPIC_API_KEY means offline; a key means anthropic; anything else is refused."""
    assert InferenceConfig.from_env({}).provider == OFFLINE
    assert InferenceConfig.from_env({"ANTHROPIC_API_KEY": "sk-ant-x"}).provider == ANTHROPIC
    assert (
        InferenceConfig.from_env({"ANTHROPIC_API_KEY": "sk-ant-x", "BULKHEAD_MODEL_PROVIDER": "offline"}).provider
        == OFFLINE
    )
    with pytest.raises(ValueError):
        InferenceConfig.from_env({"BULKHEAD_MODEL_PROVIDER": "openai"})


async def test_offline_replies_are_deterministic_and_metered(mesh):
    """Same request, same reply; the stream spells out the unary reply; usage reaches metering; no network."""
    mesh.env_overrides["BULKHEAD_MODEL_PROVIDER"] = "offline"
    offline = await mesh.start_proxy(database="offline.db")
    p = params("tell me a story")
    first = await offline.stub.CreateMessage(pb.CreateMessageRequest(params=p), metadata=mesh.md("t_a"))
    second = await offline.stub.CreateMessage(pb.CreateMessageRequest(params=p), metadata=mesh.md("t_a"))
    assert first.id == second.id and first.content == second.content
    assert first.content[0].text.text == f"[offline {PINNED}] tell me a story"
    assert first.call.provider == OFFLINE and first.usage.output_tokens == 6
    events = [e async for e in offline.stub.StreamMessage(pb.StreamMessageRequest(params=p), metadata=mesh.md("t_a"))]
    text = "".join(e.content_block_delta.text for e in events if e.HasField("content_block_delta"))
    assert text.strip() == first.content[0].text.text
    assert mesh.fake.requests == []
    await mesh.settle()
    (row,) = await mesh.metered("t_a")
    assert row[:2] == (PINNED, 3)


async def test_offline_tool_choice_calls_the_tool(mesh):
    """With tool_choice any, the offline provider calls the first tool, so agent loops can be exercised."""
    mesh.env_overrides["BULKHEAD_MODEL_PROVIDER"] = "offline"
    offline = await mesh.start_proxy(database="offline.db")
    p = params("weather?", tools=[pb.Tool(name="get_weather")], tool_choice=pb.ToolChoice(type=pb.TOOL_CHOICE_TYPE_ANY))
    resp = await offline.stub.CreateMessage(pb.CreateMessageRequest(params=p), metadata=mesh.md("t_a"))
    assert resp.stop_reason == pb.STOP_REASON_TOOL_USE and resp.content[0].tool_use.name == "get_weather"


def test_offline_agent_uses_each_offered_tool_once_then_answers():
    """Offered tools (tool_choice auto), the offline model calls each once in order, then reports the last result."""
    from services.inference.providers import _offline_message

    tools = [
        {
            "name": "handoff",
            "input_schema": {
                "type": "object",
                "properties": {
                    "agent": {"type": "string", "enum": ["specialist", "billing"]},
                    "reason": {"type": "string"},
                },
            },
        },
        {"name": "lookup", "input_schema": {"type": "object", "properties": {"id": {"type": "integer"}}}},
    ]
    body = {"model": "m", "max_tokens": 50, "tools": tools, "messages": [{"role": "user", "content": "help"}]}
    first = _offline_message(body)
    assert first["stop_reason"] == "tool_use"
    assert first["content"][0]["name"] == "handoff"
    assert first["content"][0]["input"] == {"agent": "specialist", "reason": "offline"}
    body["messages"] += [
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "ok"}]},
    ]
    second = _offline_message(body)
    assert second["content"][0]["name"] == "lookup" and second["content"][0]["input"] == {"id": 1}
    body["messages"] += [
        {"role": "assistant", "content": second["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "y", "content": "plan gold"}]},
    ]
    final = _offline_message(body)
    assert final["stop_reason"] == "end_turn" and final["content"][0]["text"].endswith("done. plan gold")
    assert _offline_message({**body, "tool_choice": {"type": "none"}})["stop_reason"] == "end_turn"
