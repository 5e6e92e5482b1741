"""Teams: the agents of a tenant, their tools and who may hand off to whom. No grpc here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

BUILTIN_TOOLS = frozenset({"read_context", "write_context"})
"""Tools every agent may list; `handoff` is offered automatically when an agent has targets."""

HANDOFF_TOOL = "handoff"

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_TOOL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
SECRET_REF = re.compile(r"\$\{secret:([A-Za-z0-9_.-]{1,128})\}")
_ANY_REF = re.compile(r"\$\{[^}]*\}")

MAX_AGENTS = 32
MAX_PROMPT_CHARS = 20_000
MAX_STEPS_CEILING = 200


@dataclass(frozen=True)
class AgentSpec:
    """One agent of a team."""

    name: str
    """Unique within the team."""
    system_prompt: str = ""
    """What the agent is for (the tenant line is added at run time)."""
    model: str = ""
    """Model name or alias for the inference proxy."""
    tools: tuple[str, ...] = ()
    """Built-in or team HTTP tool names."""
    handoffs: tuple[str, ...] = ()
    """Agents of the same team this one may hand off to."""
    max_steps: int = 0
    """Model calls allowed per run (0 = service default)."""
    max_tokens: int = 0
    """max_tokens per model call (0 = service default)."""


@dataclass(frozen=True)
class HttpToolSpec:
    """An HTTP integration the team's agents can call."""

    name: str
    """Name the model calls it by."""
    url: str
    """Absolute http(s) URL; its host must be allowed."""
    method: str = "GET"
    """GET (input as query) or POST (input as JSON body)."""
    description: str = ""
    """Shown to the model."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Header templates; values may hold ${secret:NAME} references."""
    input_schema: Mapping[str, Any] = field(default_factory=dict)
    """JSON schema of the input, shown to the model."""

    def secret_names(self) -> list[str]:
        """The secrets this tool needs, in header order."""
        return [m for v in self.headers.values() for m in SECRET_REF.findall(v)]


@dataclass(frozen=True)
class TeamSpec:
    """A team definition as stored (without etag and times)."""

    name: str
    """Unique within the tenant."""
    agents: tuple[AgentSpec, ...]
    """At least one; the first is the default entry agent."""
    description: str = ""
    """Free text."""
    http_tools: tuple[HttpToolSpec, ...] = ()
    """Tools the agents may name."""
    allowed_hosts: tuple[str, ...] = ()
    """host or host:port entries HTTP tools may reach."""

    def agent(self, name: str) -> AgentSpec | None:
        """The agent called `name`, or None."""
        return next((a for a in self.agents if a.name == name), None)

    def http_tool(self, name: str) -> HttpToolSpec | None:
        """The HTTP tool called `name`, or None."""
        return next((t for t in self.http_tools if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form for storage and run snapshots."""
        return {
            "name": self.name,
            "description": self.description,
            "agents": [
                {
                    "name": a.name,
                    "system_prompt": a.system_prompt,
                    "model": a.model,
                    "tools": list(a.tools),
                    "handoffs": list(a.handoffs),
                    "max_steps": a.max_steps,
                    "max_tokens": a.max_tokens,
                }
                for a in self.agents
            ],
            "http_tools": [
                {
                    "name": t.name,
                    "url": t.url,
                    "method": t.method,
                    "description": t.description,
                    "headers": dict(t.headers),
                    "input_schema": dict(t.input_schema),
                }
                for t in self.http_tools
            ],
            "allowed_hosts": list(self.allowed_hosts),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeamSpec:
        """Inverse of to_dict (also accepts the shape of a team.yaml file)."""
        return cls(
            name=str(d.get("name", "")),
            description=str(d.get("description", "") or ""),
            agents=tuple(
                AgentSpec(
                    name=str(a.get("name", "")),
                    system_prompt=str(a.get("system_prompt", "") or ""),
                    model=str(a.get("model", "") or ""),
                    tools=tuple(a.get("tools") or ()),
                    handoffs=tuple(a.get("handoffs") or ()),
                    max_steps=int(a.get("max_steps") or 0),
                    max_tokens=int(a.get("max_tokens") or 0),
                )
                for a in d.get("agents") or ()
            ),
            http_tools=tuple(
                HttpToolSpec(
                    name=str(t.get("name", "")),
                    url=str(t.get("url", "")),
                    method=str(t.get("method") or "GET").upper(),
                    description=str(t.get("description", "") or ""),
                    headers=dict(t.get("headers") or {}),
                    input_schema=dict(t.get("input_schema") or {}),
                )
                for t in d.get("http_tools") or ()
            ),
            allowed_hosts=tuple(d.get("allowed_hosts") or ()),
        )


def host_of(url: str) -> str:
    """host[:port] of a URL as written in allowed_hosts (port only when explicit)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return f"{host}:{parts.port}" if parts.port else host


def host_allowed(url: str, allowed_hosts: tuple[str, ...] | list[str]) -> bool:
    """Whether url's scheme is http(s) and its host (with or without port) is on the list."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    allowed = {h.lower() for h in allowed_hosts}
    return host_of(url) in allowed or (parts.port is None and parts.hostname.lower() in allowed)


def validate_team(team: TeamSpec) -> dict[str, str]:
    """Every problem with a team definition, as field path -> description (empty when valid)."""
    v: dict[str, str] = {}
    if not _NAME.match(team.name):
        v["team.name"] = "must be 1-63 chars: a lower-case letter, then lower-case letters, digits, '-' or '_'"
    if not team.agents:
        v["team.agents"] = "a team needs at least one agent"
    if len(team.agents) > MAX_AGENTS:
        v["team.agents"] = f"at most {MAX_AGENTS} agents"
    for i, host in enumerate(team.allowed_hosts):
        if not host or "/" in host or "@" in host or host != host.strip():
            v[f"team.allowed_hosts[{i}]"] = "must be a host or host:port"
    tool_names: set[str] = set()
    for i, tool in enumerate(team.http_tools):
        p = f"team.http_tools[{i}]"
        if not _TOOL_NAME.match(tool.name) or tool.name in BUILTIN_TOOLS or tool.name == HANDOFF_TOOL:
            v[f"{p}.name"] = "must be a letter then letters, digits, '-' or '_', and not a built-in tool name"
        elif tool.name in tool_names:
            v[f"{p}.name"] = f"duplicate tool name {tool.name!r}"
        tool_names.add(tool.name)
        if tool.method not in ("GET", "POST"):
            v[f"{p}.method"] = "must be GET or POST"
        if urlsplit(tool.url).scheme not in ("http", "https") or not urlsplit(tool.url).hostname:
            v[f"{p}.url"] = "must be an absolute http(s) URL"
        elif not host_allowed(tool.url, team.allowed_hosts):
            v[f"{p}.url"] = f"host {host_of(tool.url)!r} is not in allowed_hosts"
        if SECRET_REF.search(tool.url) or _ANY_REF.search(tool.url):
            v[f"{p}.url"] = "secret references are only allowed in header values"
        for h, value in tool.headers.items():
            if len(_ANY_REF.findall(value)) != len(SECRET_REF.findall(value)):
                v[f"{p}.headers.{h}"] = "malformed reference: use ${secret:NAME}"
    agent_names: set[str] = set()
    for i, agent in enumerate(team.agents):
        p = f"team.agents[{i}]"
        if not _NAME.match(agent.name):
            v[f"{p}.name"] = "must be a lower-case letter, then lower-case letters, digits, '-' or '_'"
        elif agent.name in agent_names:
            v[f"{p}.name"] = f"duplicate agent name {agent.name!r}"
        agent_names.add(agent.name)
        if len(agent.system_prompt) > MAX_PROMPT_CHARS:
            v[f"{p}.system_prompt"] = f"at most {MAX_PROMPT_CHARS} characters"
        if not 0 <= agent.max_steps <= MAX_STEPS_CEILING:
            v[f"{p}.max_steps"] = f"must be between 0 and {MAX_STEPS_CEILING}"
        if not 0 <= agent.max_tokens <= 64_000:
            v[f"{p}.max_tokens"] = "must be between 0 and 64000"
        for j, tool_name in enumerate(agent.tools):
            if tool_name not in BUILTIN_TOOLS and tool_name not in tool_names:
                v[f"{p}.tools[{j}]"] = f"unknown tool {tool_name!r}"
    for i, agent in enumerate(team.agents):
        for j, target in enumerate(agent.handoffs):
            if target == agent.name or target not in agent_names:
                v[f"team.agents[{i}].handoffs[{j}]"] = f"{target!r} is not another agent of this team"
    return v
