"""issue 14 in a real browser: Debian's Chromium, driven by Playwright, against `bulkhead up` with its console."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import uuid
from decimal import Decimal

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from bulkhead.identity.v1 import identity_pb2 as idp
from bulkhead.metering.v1 import metering_pb2 as mtr
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orc
from bulkhead_cli.usage import query_rows
from console import usage_csv
from console._figures import status_counts, total_cost
from tests.console.conftest import run, shot, sign_in

pytestmark = [pytest.mark.slow]

REQUEST_ID = re.compile(rb'<code class="request-id">[0-9a-f]{32}</code>')
# Every page a signed-in tenant can open, by screenshot name; {run} and {secret} are tenant A's own.
PAGES = {
    "overview": "/overview",
    "overview-7d": "/overview?window=7d",
    "runs": "/runs",
    "run": "/runs/{run}",
    "threads": "/threads",
    "thread": "/threads/{run}",
    "usage": "/usage",
    "secrets": "/secrets",
    "secret": "/secrets/{secret}",
    "security": "/security",
    "keys": "/keys",
}
CONTROLS = "input:not([type=hidden]), select, textarea, button"


def _pages(rig) -> dict[str, str]:
    return {name: path.format(run=rig.a.run_id, secret=rig.a.secret_name) for name, path in PAGES.items()}


def _random_like(value: str) -> str:
    """An id of the same shape (prefix kept) that no tenant has."""
    head, sep, tail = value.rpartition("_")
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return head + sep + "".join(secrets.choice(alphabet) for _ in tail) if sep else uuid.uuid4().hex


def _figure(page, name: str, scope: str = "") -> str:
    return page.locator(f'{scope} [data-figure="{name}"]'.strip()).first.inner_text().strip()


# --- signed out ---------------------------------------------------------------------------------------


def test_signed_out_browser_reaches_no_page(rig, browser):
    """Every page, fragment, download and POST sends a browser without a session to the sign-in form."""
    context = browser.new_context(base_url=rig.url)
    page = context.new_page()
    try:
        paths = [
            *_pages(rig).values(),
            "/runs/table",
            f"/runs/{rig.a.run_id}/timeline",
            "/overview/live",
            "/usage.csv",
            f"/runs/{rig.b.run_id}",
            "/no/such/page",
        ]
        for path in paths:
            response = page.goto(path)
            assert page.url == f"{rig.url}/signin", path
            assert response.status == 200 and "Sign in" in page.content()
            assert rig.a.tenant_id not in page.content() and rig.a.run_id not in page.content()
        shot(page, "signin")
        for path in ("/keys", f"/runs/{rig.a.run_id}/cancel", "/signout"):
            refused = page.request.post(path, form={"name": "x"}, max_redirects=0)
            assert refused.status == 303 and refused.headers["location"] == "/signin", path
        # An htmx poll gets a 401 that tells htmx to go to the sign-in page, not a page pasted into a fragment.
        poll = page.request.get("/runs/table", headers={"HX-Request": "true"}, max_redirects=0)
        assert poll.status == 401 and poll.headers["hx-redirect"] == "/signin"
        # A made-up session cookie is no session.
        context.add_cookies([{"name": "bk_session", "value": secrets.token_urlsafe(32), "url": rig.url}])
        page.goto("/overview")
        assert page.url == f"{rig.url}/signin"
    finally:
        context.close()


def test_wrong_api_key_is_refused_without_echo(rig, browser):
    """A refused key gets the form again with a message that does not repeat the key."""
    context = browser.new_context(base_url=rig.url)
    page = context.new_page()
    try:
        page.goto("/signin")
        wrong = "bk_" + secrets.token_hex(20)
        page.get_by_label("API key").fill(wrong)
        page.get_by_role("button", name="Sign in").click()
        assert page.get_by_role("alert").inner_text() == "that API key was not accepted"
        assert wrong not in page.content() and page.url == f"{rig.url}/signin"
        assert not [c for c in context.cookies() if c["name"] == "bk_session"]
    finally:
        context.close()


# --- signed in as A ------------------------------------------------------------------------------------


def test_session_cookie_is_httponly_and_strict(rig, signed_in):
    """The cookie carries a random session id only: HttpOnly, SameSite=Strict, no token in it."""
    (cookie,) = [c for c in signed_in.context.cookies() if c["name"] == "bk_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert not cookie["value"].startswith("eyJ") and len(cookie["value"]) >= 40
    assert signed_in.evaluate("document.cookie") == ""  # not readable by scripts


def test_every_page_renders_a_only_and_no_secret(rig, signed_in):
    """Every page opens for A (screenshot saved), names A's tenant, and shows no secret, token or B's data."""
    page = signed_in
    for name, path in _pages(rig).items():
        response = page.goto(path)
        assert response.status == 200, (path, page.content()[:2000])
        page.wait_for_load_state("networkidle")
        html = page.content()
        assert page.locator("#tenant-id").inner_text() == rig.a.tenant_id, path
        for leaked in (
            rig.a.secret_value,
            rig.b.secret_value,
            rig.a.api_key,
            rig.b.api_key,
            rig.b.tenant_id,
            rig.b.run_id,
            rig.b.secret_name,
        ):
            assert leaked not in html, (path, "leaks")
        assert not re.search(r"eyJ[\w-]{10,}\.", html), f"{path} shows a token"
        shot(page, name)
    # A's own run, its steps and its secret are on the pages that list them.
    page.goto("/runs")
    assert page.locator(f'tr[data-run="{rig.a.run_id}"]').get_attribute("data-status") == "succeeded"
    page.goto(f"/runs/{rig.a.run_id}")
    kinds = page.locator("ol.timeline li .kind").all_inner_texts()
    assert "model call" in kinds and "handoff" in " ".join(kinds) and "tool call" in kinds, kinds
    page.goto("/threads")
    assert page.locator(f'tr[data-thread="{rig.a.run_id}"]').count() == 1
    page.goto("/secrets")
    assert page.get_by_role("link", name=rig.a.secret_name).count() == 1
    assert "Hash chain intact" in page.locator("#chain").inner_text()


def test_b_ids_get_the_same_404_as_random_ids(rig, signed_in):
    """URLs built from B's run, thread and secret ids return the random-id 404 page, byte for byte."""
    page = signed_in
    b, a = rig.b, rig.a
    pairs = [
        (f"/runs/{b.run_id}", f"/runs/{_random_like(b.run_id)}"),
        (f"/runs/{b.run_id}/timeline", f"/runs/{_random_like(b.run_id)}/timeline"),
        (f"/threads/{b.run_id}", f"/threads/{_random_like(b.run_id)}"),
        (f"/secrets/{b.secret_name}", f"/secrets/{_random_like(b.secret_name)}"),
    ]
    reference = None
    for foreign, random in pairs:
        bodies = []
        for path in (foreign, random):
            response = page.goto(path)
            assert response.status == 404, path
            bodies.append(REQUEST_ID.sub(b"", response.body()))
        assert bodies[0] == bodies[1], foreign
        assert b.run_id.encode() not in bodies[0] and b.secret_name.encode() not in bodies[0]
        reference = reference or bodies[0]
        assert bodies[0] == reference  # one 404 page for every kind of id
    shot(page, "not-found")
    # State-changing requests with B's ids (and a valid CSRF token) get the same page and change nothing.
    csrf = page.locator('form.signout input[name="csrf"]').get_attribute("value")
    for foreign, random in (
        (f"/runs/{b.run_id}/cancel", f"/runs/{_random_like(b.run_id)}/cancel"),
        (f"/keys/{b.key_id}/revoke", f"/keys/{_random_like(b.key_id)}/revoke"),
    ):
        got = [page.request.post(path, form={"csrf": csrf}, max_redirects=0) for path in (foreign, random)]
        assert [r.status for r in got] == [404, 404], foreign
        assert REQUEST_ID.sub(b"", got[0].body()) == REQUEST_ID.sub(b"", got[1].body()) == reference

    async def b_untouched():
        async with await rig.client(b) as bh:  # B's key still works and B's run is as it was
            return (await bh.orchestrator.GetRun(orc.GetRunRequest(run_id=b.run_id))).run.status

    assert run(b_untouched()) == orc.RUN_STATUS_SUCCEEDED
    assert a.tenant_id != b.tenant_id


def test_post_without_csrf_token_is_refused(rig, signed_in):
    """A state-changing request without (or with a wrong) CSRF token is refused and changes nothing."""
    page = signed_in
    page.goto("/keys")
    keys_before = page.locator("#keys tbody tr").count()
    for form in ({"name": "no-csrf"}, {"name": "bad-csrf", "csrf": secrets.token_urlsafe(32)}):
        refused = page.request.post("/keys", form=form, max_redirects=0)
        assert refused.status == 403 and "CSRF" in refused.text()
    refused = page.request.post("/signout", form={}, max_redirects=0)
    assert refused.status == 403
    page.goto("/keys")
    assert page.locator("#keys tbody tr").count() == keys_before  # nothing created, still signed in
    # The same form with its token works: a key is created and shown once.
    page.get_by_label("Name").fill("console-test")
    page.get_by_role("button", name="Create key").click()
    new_key = page.get_by_label("API key").input_value()
    assert new_key.startswith("bk_") and page.locator("#keys tbody tr").count() == keys_before + 1
    shot(page, "keys-created")
    page.goto("/keys")
    assert new_key not in page.content()  # shown once only


async def _start_and_finish(rig) -> tuple[orc.Run, float]:
    """One more run of A's support team, watched to its end; returns it and when it ended (monotonic)."""
    async with await rig.client(rig.a) as bh:
        started = await bh.orchestrator.StartRun(
            orc.StartRunRequest(
                team="support", entry_agent="triage", input="What plan am I on?", idempotency_key=uuid.uuid4().hex
            )
        )
        async for _ in bh.orchestrator.WatchRun(orc.WatchRunRequest(run_id=started.run.run_id)):
            pass
        final = (await bh.orchestrator.GetRun(orc.GetRunRequest(run_id=started.run.run_id))).run
        return final, time.monotonic()


def test_finished_run_appears_on_runs_page_without_reload(rig, signed_in):
    """A run started and finished elsewhere shows up, succeeded, on an open Runs page within 5 s."""
    page = signed_in
    page.goto("/runs")
    page.evaluate("window.__notReloaded = true")

    final, finished_at = run(_start_and_finish(rig))
    assert final.status == orc.RUN_STATUS_SUCCEEDED, final
    row = page.locator(f'tr[data-run="{final.run_id}"][data-status="succeeded"]')
    row.wait_for(timeout=5000)
    assert time.monotonic() - finished_at < 5.0
    assert page.evaluate("window.__notReloaded") is True  # htmx swapped the table; the page was not reloaded
    shot(page, "runs-live")


async def _ledger(rig, start: dt.datetime, end: dt.datetime, group_by: list[int]) -> list[mtr.UsageRow]:
    async with await rig.client(rig.a) as bh:
        resp = await bh.metering.QueryUsage(
            mtr.QueryUsageRequest(
                filter=mtr.UsageFilter(start_time=_ts(start), end_time=_ts(end)), group_by=group_by, page_size=1000
            )
        )
        assert not resp.next_page_token
        return list(resp.rows)


async def _all_runs(rig) -> list[orc.Run]:
    async with await rig.client(rig.a) as bh:
        resp = await bh.orchestrator.ListRuns(orc.ListRunsRequest(page_size=200))
        assert not resp.next_page_token
        return list(resp.runs)


def _ts(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _settled(fetch, timeout: float = 10.0):
    """The ledger once two reads a second apart agree (the proxy's outbox delivers just after a run ends)."""
    deadline = time.monotonic() + timeout
    previous = run(fetch())
    while time.monotonic() < deadline:
        time.sleep(1.0)
        current = run(fetch())
        if current == previous:
            return current
        previous = current
    raise AssertionError("the usage ledger did not settle")


def test_overview_and_usage_equal_the_ledgers(rig, signed_in, tmp_path):
    """After a known workload (the demo's run and one more), Overview and Usage show QueryUsage's and ListRuns'
    numbers exactly, and the CSV is the CLI's."""
    page = signed_in
    final, _ = run(_start_and_finish(rig))  # the known workload: the demo's run and this one (3 model calls each)
    assert final.status == orc.RUN_STATUS_SUCCEEDED
    now = dt.datetime.now(dt.UTC)
    day_ago, soon = now - dt.timedelta(hours=24), now + dt.timedelta(minutes=1)
    by_agent = _settled(lambda: _ledger(rig, day_ago, soon, [mtr.USAGE_GROUPING_AGENT]))
    by_model = run(_ledger(rig, day_ago, soon, [mtr.USAGE_GROUPING_MODEL]))
    runs = run(_all_runs(rig))
    assert len(runs) >= 2 and sum(r.event_count for r in by_model) >= 6

    page.goto("/overview")
    assert int(_figure(page, "runs")) == len(runs)
    assert int(_figure(page, "calls")) == sum(r.event_count for r in by_model)
    assert int(_figure(page, "errors")) == sum(r.error_count for r in by_model)
    assert Decimal(_figure(page, "spend").removeprefix("$")) == total_cost(by_model)
    for name, count in status_counts(runs).items():
        assert int(_figure(page, f"status-{name}")) == count, name
    for row in by_agent:
        scope = f'tr[data-agent="{row.agent_id}"]'
        assert int(_figure(page, "calls", scope)) == row.event_count, row.agent_id
        assert Decimal(_figure(page, "cost", scope)) == Decimal(row.cost_usd), row.agent_id
        assert int(_figure(page, "runs", scope)) == sum(r.entry_agent == row.agent_id for r in runs)
    assert page.locator("#agents tbody tr[data-agent]").count() == len(
        {r.agent_id for r in by_agent} | {r.entry_agent for r in runs}
    )

    since, until = (now - dt.timedelta(days=2)).replace(microsecond=0), soon.replace(microsecond=0)
    query = urllib.parse.urlencode({"since": since.isoformat(), "until": until.isoformat(), "by": "day,model,agent"})
    page.goto(f"/usage?{query}")
    lines = run(
        _ledger(rig, since, until, [mtr.USAGE_GROUPING_DAY, mtr.USAGE_GROUPING_MODEL, mtr.USAGE_GROUPING_AGENT])
    )
    assert int(_figure(page, "calls")) == sum(r.event_count for r in lines)
    assert Decimal(_figure(page, "total").removeprefix("$")) == total_cost(lines)
    shown = [row.locator("td").all_inner_texts() for row in page.locator("#usage-lines tbody tr").all()]
    assert [[c.strip() for c in row] for row in shown] == query_rows(lines, hourly=False)
    # The CSV link downloads the file `bulkhead usage query --csv` writes for the same range.
    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    got = download.value.path().read_bytes()
    assert got == usage_csv(query_rows(lines, hourly=False)).encode()
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "bulkhead_cli",
            "usage",
            "query",
            "--by",
            "day,model,agent",
            "--since",
            since.isoformat(),
            "--until",
            until.isoformat(),
            "--csv",
            str(tmp_path / "c.csv"),
            "--api-key",
            rig.a.api_key,
        ],
        env=rig.mesh.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert got == (tmp_path / "c.csv").read_bytes()


async def _refuse_calls(rig) -> tuple[str, str]:
    """As tenant A with genuine tokens: claim B's tenant at state (TENANT_MISMATCH, twice) and call credentials
    with a token narrowed to one scope (MISSING_SCOPE). Returns the principals that were refused."""
    import grpc

    from bulkhead.credentials.v1 import credentials_pb2 as cred
    from bulkhead.credentials.v1 import credentials_pb2_grpc
    from bulkhead.state.v1 import state_pb2 as st
    from bulkhead.state.v1 import state_pb2_grpc

    async with await rig.client(None) as anyone:
        full = await anyone.identity.IssueToken(idp.IssueTokenRequest(api_key=rig.a.api_key))
        narrow = await anyone.identity.IssueToken(
            idp.IssueTokenRequest(api_key=rig.a.api_key, scopes=["state.threads.read"])
        )
    async with (
        grpc.aio.insecure_channel(rig.addresses["state"]) as state_ch,
        grpc.aio.insecure_channel(rig.addresses["credentials"]) as cred_ch,
    ):
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await state_pb2_grpc.StateServiceStub(state_ch).ListThreads(
                    st.ListThreadsRequest(),
                    metadata=(("authorization", f"Bearer {full.token}"), ("x-tenant-id", rig.b.tenant_id)),
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await credentials_pb2_grpc.CredentialsServiceStub(cred_ch).ListSecrets(
                cred.ListSecretsRequest(),
                metadata=(("authorization", f"Bearer {narrow.token}"), ("x-tenant-id", rig.a.tenant_id)),
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return full.tenant_id, narrow.tenant_id


def test_security_page_shows_the_tenants_own_refused_calls(rig, signed_in):
    """A's refused calls at two services (a claimed tenant that is not the token's, a missing scope) appear on
    A's Security page, from the services' ledgers, within a flush interval; B's name appears nowhere on it."""
    page = signed_in
    assert run(_refuse_calls(rig)) == (rig.a.tenant_id, rig.a.tenant_id)
    deadline = time.monotonic() + 30  # the services flush every few seconds
    while True:
        page.goto("/security")
        rows = {
            (r.get_attribute("data-service"), r.get_attribute("data-reason")): int(
                r.locator('[data-figure="count"]').inner_text()
            )
            for r in page.locator("#security-events tbody tr[data-service]").all()
        }
        if rows.get(("state", "TENANT_MISMATCH"), 0) >= 2 and rows.get(("credentials", "MISSING_SCOPE"), 0) >= 1:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(1.0)
    assert "ListThreads" in page.locator("#security-events").inner_text()
    assert int(_figure(page, "refused-24h")) >= 3 and int(_figure(page, "refused-7d")) >= 3
    assert page.locator("svg.chart title").first.text_content().startswith("Refused calls by reason")
    assert page.locator("#security-missing").count() == 0  # every service answered
    html = page.content()
    assert rig.b.tenant_id not in html and rig.a.api_key not in html and not re.search(r"eyJ[\w-]{10,}\.", html)
    page.get_by_label("Window").select_option("7d")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(f"{rig.url}/security?window=7d")
    assert page.locator('#security-events tr[data-reason="TENANT_MISMATCH"]').count() >= 1
    shot(page, "security-refused-calls")


def _accessible_controls(page) -> list[dict]:
    """Chromium's own accessibility tree: role and computed name of every focusable control."""
    cdp = page.context.new_cdp_session(page)
    try:
        nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    finally:
        cdp.detach()
    out = []
    for node in nodes:
        role = node.get("role", {}).get("value")
        if node.get("ignored") or role not in (
            "button",
            "textbox",
            "combobox",
            "checkbox",
            "radio",
            "searchbox",
            "spinbutton",
            "listbox",
            "link",
        ):
            continue
        out.append({"role": role, "name": (node.get("name") or {}).get("value", "").strip()})
    return out


def test_every_page_has_labelled_controls_and_keyboard_reach(rig, signed_in):
    """Every control has an accessible name (Chromium's own computation) and Tab reaches the nav and the controls."""
    page = signed_in
    nav = ["Overview", "Runs", "Threads", "Usage", "Secrets", "Security", "Keys"]
    for name, path in {"signin": None, **_pages(rig), "not-found": f"/runs/{_random_like(rig.a.run_id)}"}.items():
        if path is None:
            context = page.context.browser.new_context(base_url=rig.url)
            target = context.new_page()
            target.goto("/signin")
        else:
            context, target = None, page
            target.goto(path)
        try:
            controls = _accessible_controls(target)
            unnamed = [c for c in controls if not c["name"]]
            assert not unnamed, (name, unnamed)
            dom_controls = target.locator(CONTROLS).count()
            assert sum(c["role"] != "link" for c in controls) >= dom_controls > 0, name
            # Tab from the top of the page: collect what receives focus, in order.
            target.evaluate("document.activeElement && document.activeElement.blur()")
            target.locator("body").focus()
            reached, wanted = [], target.locator(f"main :is({CONTROLS})").count()
            for _ in range(200):
                target.keyboard.press("Tab")
                info = target.evaluate("""() => { const e = document.activeElement;
                    return e ? {tag: e.tagName, text: (e.innerText || e.value || '').trim(), id: e.id,
                                inMain: !!e.closest('main'), inNav: !!e.closest('nav'),
                                control: e.matches('input, select, textarea, button')} : null }""")
                if info is None or info["tag"] == "BODY" or (reached and info == reached[0]):
                    break
                reached.append(info)
            assert reached and reached[0]["text"] == "Skip to content", (name, reached[:2])
            if path is not None:
                assert [r["text"] for r in reached if r["inNav"]] == nav, name
                assert any(r["tag"] == "BUTTON" and r["text"] == "Sign out" for r in reached), name
            assert sum(r["inMain"] and r["control"] for r in reached) == wanted, name
        finally:
            if context is not None:
                context.close()
    # The skip link moves focus to the page's content.
    page.goto("/runs")
    page.locator("body").focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"


async def _revoked_jtis(rig) -> set[str]:
    async with await rig.client(None) as operator:
        return {r.jti for r in (await operator.identity.ListRevokedTokens(idp.ListRevokedTokensRequest())).revoked}


def test_sign_out_revokes_the_token_and_ends_the_session(rig, browser):
    """Signing out revokes the session's token at identity and forgets the session: its cookie reaches no page."""
    context = browser.new_context(base_url=rig.url)
    try:
        page = sign_in(context, rig.url, rig.a.api_key)
        (cookie,) = [c for c in context.cookies() if c["name"] == "bk_session"]
        before = run(_revoked_jtis(rig))
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(f"{rig.url}/signin")
        assert len(run(_revoked_jtis(rig)) - before) == 1  # the session's token, and only it
        context.add_cookies([cookie])  # replay the old session id
        for path in ("/overview", f"/runs/{rig.a.run_id}", "/keys"):
            page.goto(path)
            assert page.url == f"{rig.url}/signin", path
    finally:
        context.close()


def test_operator_picks_a_tenant_and_every_view_is_audited(rig, browser, signed_in):
    """The operator key opens a tenant picker; A's usage then shows A's ledger, and metering's operator audit
    holds every RPC of that page view under the page's request id. Tenant pages stay closed to operators,
    and the picker stays closed to tenants."""
    context = browser.new_context(base_url=rig.url, viewport={"width": 1280, "height": 900})
    try:
        page = sign_in(context, rig.url, rig.operator_key, landing="/tenants")
        options = page.get_by_label("Tenant").locator("option").evaluate_all("os => os.map(o => o.value)")
        assert {rig.a.tenant_id, rig.b.tenant_id} <= set(options) and "t_platform" not in options
        assert not [c for c in _accessible_controls(page) if not c["name"]]
        shot(page, "operator-tenants")
        for path in ("/overview", f"/runs/{rig.a.run_id}", f"/threads/{rig.a.run_id}", "/secrets", "/keys"):
            response = page.goto(path)
            assert (
                response.status == 403
                and page.get_by_role("heading").first.inner_text() == "Not available to operators"
            ), path
            assert rig.a.secret_name not in page.content() and "Its event log" not in page.content(), path
        page.goto("/tenants")
        page.get_by_label("Tenant").select_option(rig.a.tenant_id)
        page.get_by_role("button", name="View usage").click()
        page.wait_for_url(f"{rig.url}/usage")

        now = dt.datetime.now(dt.UTC)
        since, until = (
            (now - dt.timedelta(days=2)).replace(microsecond=0),
            (now + dt.timedelta(minutes=1)).replace(microsecond=0),
        )
        query = urllib.parse.urlencode(
            {"since": since.isoformat(), "until": until.isoformat(), "by": "day,model,agent"}
        )
        page.goto(f"/usage?{query}")
        assert page.locator("#tenant-id").inner_text() == rig.a.tenant_id
        lines = _settled(
            lambda: _ledger(
                rig, since, until, [mtr.USAGE_GROUPING_DAY, mtr.USAGE_GROUPING_MODEL, mtr.USAGE_GROUPING_AGENT]
            )
        )
        page.goto(f"/usage?{query}")  # again, now that the ledger is known to be still
        shown = [row.locator("td").all_inner_texts() for row in page.locator("#usage-lines tbody tr").all()]
        assert [[c.strip() for c in row] for row in shown] == query_rows(lines, hourly=False) != []
        assert rig.operator_key not in page.content() and rig.a.api_key not in page.content()
        shot(page, "operator-usage")
        request_id = page.locator("footer .request-id").inner_text()
        with sqlite3.connect(rig.mesh.data_dir / "metering.db") as db:
            audited = db.execute(
                "SELECT method, target_tenant FROM metering_operator_audit WHERE request_id = ?", (request_id,)
            ).fetchall()
        assert audited and set(audited) == {("QueryTenantUsage", rig.a.tenant_id)}, audited
    finally:
        context.close()
    # A tenant's session has no picker: the same 404 as any unknown page, and picking changes nothing.
    response = signed_in.goto("/tenants")
    assert response.status == 404 and signed_in.get_by_role("heading").first.inner_text() == "Not found"
    csrf = signed_in.locator('form.signout input[name="csrf"]').get_attribute("value")
    refused = signed_in.request.post(
        "/tenants/pick", form={"csrf": csrf, "tenant_id": rig.b.tenant_id}, max_redirects=0
    )
    assert refused.status == 404
    signed_in.goto("/overview")
    assert signed_in.locator("#tenant-id").inner_text() == rig.a.tenant_id
