"""`bulkhead teams apply|list|get|delete`: a tenant's agent teams, defined in YAML files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import yaml
from google.protobuf import json_format

from bulkhead.client import pages
from bulkhead.orchestrator.v1 import orchestrator_pb2 as pb
from bulkhead_cli._common import add_connection_args, connect, fail, run_async, table

EXAMPLE = """\
name: support
description: front desk with a billing specialist
allowed_hosts: [billing.internal:8080]
agents:
  - name: triage
    model: claude-sonnet-4-5
    system_prompt: Work out what the customer needs and hand off.
    handoffs: [billing]
  - name: billing
    model: claude-sonnet-4-5
    system_prompt: Answer billing questions using the invoice tool.
    tools: [lookup_invoice, read_context, write_context]
http_tools:
  - name: lookup_invoice
    description: Look up an invoice by id
    method: GET
    url: http://billing.internal:8080/invoices
    headers: {authorization: "Bearer ${secret:billing_api_key}"}
    input_schema: {type: object, properties: {invoice: {type: string}}, required: [invoice]}
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "teams",
        help="define agent teams (apply a YAML file)",
        epilog="team.yaml example:\n\n" + EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    apply = sub.add_parser("apply", help="create the team in a YAML file, or update it if it exists")
    apply.add_argument("-f", "--file", required=True, help="team definition (YAML); - reads stdin")
    apply.set_defaults(func=_apply)
    listing = sub.add_parser("list", help="list teams")
    listing.set_defaults(func=_list)
    get = sub.add_parser("get", help="print a team as YAML")
    get.add_argument("name")
    get.set_defaults(func=_get)
    delete = sub.add_parser("delete", help="delete a team")
    delete.add_argument("name")
    delete.set_defaults(func=_delete)
    for cmd in sub.choices.values():
        add_connection_args(cmd)


def load_team(text: str) -> pb.Team:
    """A team from YAML text; exits with the offending field when it does not fit the schema."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        fail(f"not valid YAML: {err}")
    if not isinstance(data, dict):
        fail("a team file is a YAML mapping with name, agents, http_tools, allowed_hosts")
    try:
        return json_format.ParseDict(data, pb.Team())
    except json_format.ParseError as err:
        fail(f"team file does not match the schema: {err}")
    raise AssertionError("unreachable")


def team_yaml(team: pb.Team) -> str:
    """A team as YAML, without output-only fields."""
    data = json_format.MessageToDict(team, preserving_proto_field_name=True)
    for key in ("etag", "create_time", "update_time"):
        data.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)


@run_async
async def _apply(args: argparse.Namespace) -> None:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    team = load_team(text)
    async with await connect(args) as bh:
        try:
            current = (await bh.orchestrator.GetTeam(pb.GetTeamRequest(name=team.name))).team
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            created = (await bh.orchestrator.CreateTeam(pb.CreateTeamRequest(team=team))).team
            print(f"team {created.name} created ({len(created.agents)} agents)")
            return
        team.etag = current.etag
        updated = (await bh.orchestrator.UpdateTeam(pb.UpdateTeamRequest(team=team))).team
        print(f"team {updated.name} updated ({len(updated.agents)} agents)")


@run_async
async def _list(args: argparse.Namespace) -> None:
    rows: list[list[object]] = []
    async with await connect(args) as bh:
        async for resp in pages(
            lambda token: bh.orchestrator.ListTeams(pb.ListTeamsRequest(page_size=200, page_token=token))
        ):
            rows += [
                [t.name, ", ".join(a.name for a in t.agents), len(t.http_tools), t.description] for t in resp.teams
            ]
    table(rows, ["team", "agents", "http tools", "description"])


@run_async
async def _get(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        team = (await bh.orchestrator.GetTeam(pb.GetTeamRequest(name=args.name))).team
    print(team_yaml(team), end="")


@run_async
async def _delete(args: argparse.Namespace) -> None:
    async with await connect(args) as bh:
        await bh.orchestrator.DeleteTeam(pb.DeleteTeamRequest(name=args.name))
    print(f"team {args.name} deleted")
