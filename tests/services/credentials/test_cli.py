"""`bulkhead secrets ...` and `bulkhead audit ...` against a real server (values via stdin only)."""

from __future__ import annotations

import asyncio
import io
import sys

import pytest

from bulkhead_cli import main


@pytest.fixture
def cli(lh, monkeypatch, capsys):
    """Run a bulkhead command as tenant alpha (in a thread: the server shares this event loop)."""
    monkeypatch.setenv("BULKHEAD_TOKEN", lh.tokens.mint(lh.alpha))
    monkeypatch.setenv("BULKHEAD_TENANT", lh.alpha)
    monkeypatch.setenv("BULKHEAD_CREDENTIALS_ADDR", lh.service.running.address)
    monkeypatch.delenv("BULKHEAD_API_KEY", raising=False)

    async def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = await asyncio.to_thread(main, list(argv))
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


async def test_put_reads_the_value_from_stdin_and_get_prints_it(cli, lh):
    """put takes the value from stdin; get writes exactly the value to stdout."""
    code, out, _ = await cli("secrets", "put", "cli-key", "--rotate-every", "3600", stdin="from-stdin-value\n")
    assert code == 0 and "version 1" in out and "from-stdin-value" not in out
    assert (await lh.get("cli-key")).value == b"from-stdin-value"
    code, out, _ = await cli("secrets", "get", "cli-key")
    assert (code, out) == (0, "from-stdin-value")


async def test_the_value_cannot_be_given_on_the_command_line(cli):
    """There is no argv slot for a value: an extra argument is a usage error."""
    code, _, err = await cli("secrets", "put", "cli-key", "value-on-argv")
    assert code == 2 and "unrecognized arguments" in err


async def test_list_describe_rotate_delete(cli, lh):
    """The rest of the group works end to end and prints no values."""
    await lh.put("listed", b"listed-value")
    code, out, _ = await cli("secrets", "list")
    assert code == 0 and "listed" in out and "listed-value" not in out
    code, out, _ = await cli("secrets", "rotate", "listed")
    assert code == 0 and "version 2" in out
    code, out, _ = await cli("secrets", "describe", "listed")
    assert code == 0 and "rotate:random" in out
    code, out, _ = await cli("secrets", "delete", "listed")
    assert code == 0 and "deleted listed" in out
    code, _, err = await cli("secrets", "get", "listed")
    assert code == 1 and "NOT_FOUND" in err
    code, out, _ = await cli("secrets", "delete", "listed", "--destroy")
    assert code == 0 and "2 versions" in out


async def test_audit_verify_passes_then_catches_tampering(cli, lh):
    """`bulkhead audit verify` exits 0 on an intact chain and 1 after a row was altered."""
    await lh.put("audited", b"audited-value")
    await lh.get("audited")
    code, out, _ = await cli("audit", "verify")
    assert code == 0 and "intact" in out
    code, out, _ = await cli("audit", "list")
    assert code == 0 and "get" in out and "audited-value" not in out
    await lh.raw(
        "UPDATE cred_audit_events SET principal_id = 'p_someone_else' WHERE tenant_id = :t AND seq = 2", {"t": lh.alpha}
    )
    code, _, err = await cli("audit", "verify")
    assert code == 1 and "BROKEN at event 2" in err
