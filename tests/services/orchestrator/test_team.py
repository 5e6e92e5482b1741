"""Team definitions: validation and round trips."""

from __future__ import annotations

from services.orchestrator.team import AgentSpec, HttpToolSpec, TeamSpec, host_allowed, validate_team


def team(**kw) -> TeamSpec:
    base = dict(
        name="support",
        agents=(AgentSpec("triage", handoffs=("billing",)), AgentSpec("billing", tools=("invoices",))),
        http_tools=(
            HttpToolSpec(
                "invoices", "http://127.0.0.1:8080/inv", headers={"authorization": "Bearer ${secret:billing_key}"}
            ),
        ),
        allowed_hosts=("127.0.0.1:8080",),
    )
    base.update(kw)
    return TeamSpec(**base)


def test_valid_team_has_no_violations():
    """A well-formed two-agent team with one HTTP tool passes."""
    assert validate_team(team()) == {}


def test_handoff_to_unknown_or_self_is_rejected():
    """Hand-off targets must be other agents of the same team."""
    v = validate_team(team(agents=(AgentSpec("triage", handoffs=("other-team/billing", "triage")),)))
    assert set(v) == {"team.agents[0].handoffs[0]", "team.agents[0].handoffs[1]"}


def test_tool_host_must_be_allowed():
    """An HTTP tool whose host is not on the allowlist is rejected at definition time."""
    v = validate_team(team(allowed_hosts=("example.com",)))
    assert "team.http_tools[0].url" in v and "not in allowed_hosts" in v["team.http_tools[0].url"]


def test_bad_names_duplicates_unknown_tools_and_refs():
    """Each problem is reported against its own field path."""
    v = validate_team(
        TeamSpec(
            name="Bad Name",
            agents=(AgentSpec("a", tools=("nope",)), AgentSpec("a", max_steps=-1)),
            http_tools=(HttpToolSpec("t", "ftp://x", method="PUT", headers={"x": "${vault:y}"}),),
        )
    )
    assert {
        "team.name",
        "team.agents[0].tools[0]",
        "team.agents[1].name",
        "team.agents[1].max_steps",
        "team.http_tools[0].method",
        "team.http_tools[0].url",
        "team.http_tools[0].headers.x",
    } <= set(v)


def test_empty_team_is_rejected():
    """A team needs at least one agent."""
    assert "team.agents" in validate_team(TeamSpec(name="x", agents=()))


def test_dict_round_trip_and_secret_names():
    """to_dict/from_dict keep everything; secret references are discoverable."""
    t = team()
    assert TeamSpec.from_dict(t.to_dict()) == t
    assert t.http_tools[0].secret_names() == ["billing_key"]


def test_host_allowed_matches_port_and_scheme():
    """Exact host:port, bare host for default ports, http(s) only."""
    assert host_allowed("http://127.0.0.1:8080/x", ["127.0.0.1:8080"])
    assert not host_allowed("http://127.0.0.1:8081/x", ["127.0.0.1:8080"])
    assert host_allowed("https://api.example.com/x", ["api.example.com"])
    assert not host_allowed("https://evil.example.com/x", ["api.example.com"])
    assert not host_allowed("file:///etc/passwd", ["api.example.com"])
