"""In-memory stand-ins for the engine's ports, for unit tests of the domain modules only.

Integration tests use the real state, inference and credentials servers instead.
"""

from __future__ import annotations

import http.server
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from services.orchestrator.ports import ModelReply, StepConflict
from services.orchestrator.steps import Step


class MemoryStepLog:
    """A step log with the same version check as the state service."""

    def __init__(self) -> None:
        self.runs: dict[str, list[Step]] = {}

    async def append(self, run_id: str, step: Step) -> None:
        steps = self.runs.setdefault(run_id, [])
        if len(steps) != step.index - 1:
            raise StepConflict(f"log at {len(steps)}, step {step.index}")
        steps.append(Step.from_json(step.to_json()))

    async def read(self, run_id: str, after: int = 0) -> list[Step]:
        return [s for s in self.runs.get(run_id, []) if s.index > after]


class MemoryContext:
    """A dict of dicts."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], str] = {}

    async def get(self, scope: str, key: str) -> str | None:
        return self.values.get((scope, key))

    async def put(self, scope: str, key: str, value: str) -> None:
        self.values[(scope, key)] = value


@dataclass
class ScriptedModel:
    """Returns scripted replies in order and records every call."""

    replies: list[ModelReply]
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def create_message(self, **kw: Any) -> ModelReply:
        self.calls.append(json.loads(json.dumps(kw)))
        return self.replies[len(self.calls) - 1]


class DictSecrets:
    """Secrets from a dict; records which were asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.asked = values, []

    async def resolve(self, refs):
        self.asked.extend(refs.values())
        return {key: self.values[name] for key, name in refs.items()}


def text(t: str) -> ModelReply:
    """A final answer."""
    return ModelReply(
        content=[{"type": "text", "text": t}], stop_reason="end_turn", usage={"input_tokens": 3, "output_tokens": 2}
    )


def tool_use(name: str, tool_input: dict[str, Any], use_id: str = "tu_1", say: str = "") -> ModelReply:
    """A reply asking for one tool call."""
    content: list[dict[str, Any]] = [{"type": "text", "text": say}] if say else []
    content.append({"type": "tool_use", "id": use_id, "name": name, "input": tool_input})
    return ModelReply(content=content, stop_reason="tool_use", usage={"input_tokens": 3, "output_tokens": 2})


class ToolServer:
    """A local HTTP server standing in for an integration; records each request's headers and path."""

    def __init__(self, status: int = 200, body: str = '{"invoice": "paid"}') -> None:
        self.requests: list[dict[str, Any]] = []
        self.status, self.body = status, body
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                owner.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": self.rfile.read(length).decode() if length else "",
                    }
                )
                payload = owner.body.encode()
                self.send_response(owner.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
