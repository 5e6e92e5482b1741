"""The console's web app: Starlette routes that read the mesh's public RPCs as the signed-in tenant."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import csv
import datetime as dt
import functools
import io
import logging
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from bulkhead.client import describe_error, pages
from bulkhead.common.v1 import security_events_pb2 as sec
from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.identity.v1 import identity_pb2 as idp
from bulkhead.metering.v1 import metering_pb2 as mtr
from bulkhead.orchestrator.v1 import orchestrator_pb2 as orc
from bulkhead.state.v1 import state_pb2 as st
from bulkhead_cli.usage import QUERY_HEADERS, query_rows
from console import _charts, _figures
from console._config import ConsoleConfig
from console._mesh import Mesh
from console._sessions import Session, Sessions, SignInFailed
from shared.tenancy import PLATFORM_TENANT

log = logging.getLogger("bulkhead.console")
HERE = Path(__file__).parent
COOKIE = "bk_session"
PRE_COOKIE = "bk_signin"
WINDOWS = {"24h": dt.timedelta(hours=24), "7d": dt.timedelta(days=7)}
MAX_RUNS_SCANNED = 2000
"""Most runs a listing reads (ListRuns pages, newest first)."""
REFUSALS_SCANNED = 500
"""Newest failed runs of a window the quota refusals are picked from."""
RUNS_PAGE = 500
"""ListRuns page size asked for (the services' maximum: fewer round trips on big tenants)."""
THREADS_PAGE = 100
"""Threads listed per page."""
SECURITY_PAGES = 20
"""ListSecurityEvents pages read per service at most (500 minute-rows each)."""
SECURITY_ROWS = 200
"""Lines of the refused-calls table (the largest counts of the window)."""
THREAD_EVENTS = 500
"""Events of one thread shown (the first ones, in version order)."""
_NOT_FOUND_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
_GROUPINGS = {
    "day": mtr.USAGE_GROUPING_DAY,
    "hour": mtr.USAGE_GROUPING_HOUR,
    "model": mtr.USAGE_GROUPING_MODEL,
    "agent": mtr.USAGE_GROUPING_AGENT,
    "principal": mtr.USAGE_GROUPING_PRINCIPAL,
}


_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("console_request_id", default=None)
"""The page request being served (each request runs in its own task), sent as x-request-id on its RPCs."""


class NotFound(Exception):
    """Render the one 404 page (unknown, foreign and malformed ids all end here)."""


class PickTenant(Exception):
    """An operator asked for a tenant's page before picking a tenant."""


class SignedOut(Exception):
    """The session's token no longer works: send the browser to sign in again."""


# --- small formatting helpers used by the templates ---------------------------------------------


def _dt(ts) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, dt.UTC) if ts.seconds or ts.nanos else None


def fmt_time(ts) -> str:
    value = _dt(ts)
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def fmt_pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}%"


def fmt_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def kind_name(value: int) -> str:
    return orc.StepKind.Name(value).removeprefix("STEP_KIND_").lower().replace("_", " ")


def enum_name(enum, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return "?"


def parse_when(text: str | None, default: dt.datetime) -> dt.datetime:
    """A UTC date or ISO time from a query parameter, as the CLI reads --since/--until."""
    if not text:
        return default
    value = dt.datetime.fromisoformat(text)  # ValueError -> 400
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# --- the app ---------------------------------------------------------------------------------------


class Console:
    """Routes and their dependencies (mesh channels, sessions, templates)."""

    def __init__(self, config: ConsoleConfig, mesh: Mesh | None = None, sessions: Sessions | None = None):
        self.config = config
        self._mesh = mesh
        self._sessions = sessions
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals.update(
            fmt_time=fmt_time, fmt_pct=fmt_pct, fmt_ms=fmt_ms, kind_name=kind_name, status_name=_figures.status_name
        )

    @property
    def mesh(self) -> Mesh:
        assert self._mesh is not None, "the console is not started"
        return self._mesh

    @property
    def sessions(self) -> Sessions:
        assert self._sessions is not None, "the console is not started"
        return self._sessions

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        owned = self._mesh is None
        if owned:
            self._mesh = Mesh(self.config.peers, self.config.env)
        if self._sessions is None:
            self._sessions = Sessions(
                self.mesh,
                token_ttl=self.config.token_ttl,
                idle=self.config.session_idle,
                max_sessions=self.config.max_sessions,
            )
        try:
            yield
        finally:
            await self.sessions.close()
            if owned:
                await self.mesh.close()

    def app(self) -> Starlette:
        """The ASGI application."""
        p = self._page

        def op(handler):  # also open to an operator who picked a tenant (through audited operator RPCs)
            return self._page(handler, operator=True)

        routes = [
            Route("/", self.home),
            Route("/healthz", self.healthz),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
            Route("/signin", self.signin_form, methods=["GET"]),
            Route("/signin", self.signin, methods=["POST"]),
            Route("/signout", op(self.signout), methods=["POST"]),
            Route("/overview", p(self.overview)),
            Route("/overview/live", p(self.overview_live)),
            Route("/runs", p(self.runs)),
            Route("/runs/table", p(self.runs_table)),
            Route("/runs/{run_id}", p(self.run)),
            Route("/runs/{run_id}/timeline", p(self.run_timeline)),
            Route("/runs/{run_id}/cancel", p(self.cancel_run), methods=["POST"]),
            Route("/threads", p(self.threads)),
            Route("/threads/{thread_id}", p(self.thread)),
            Route("/usage", op(self.usage)),
            Route("/usage.csv", op(self.usage_csv)),
            Route("/tenants", op(self.tenants), methods=["GET"]),
            Route("/tenants/pick", op(self.pick_tenant), methods=["POST"]),
            Route("/secrets", p(self.secrets)),
            Route("/secrets/{name}", p(self.secret)),
            Route("/security", p(self.security)),
            Route("/keys", p(self.keys), methods=["GET"]),
            Route("/keys", p(self.create_key), methods=["POST"]),
            Route("/keys/{key_id}/revoke", p(self.revoke_key), methods=["POST"]),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]
        return Starlette(
            routes=routes,
            lifespan=self.lifespan,
            middleware=[Middleware(_Headers)],
            exception_handlers={404: self._not_found_handler, 405: self._not_found_handler},
        )

    # --- plumbing --------------------------------------------------------------------------------

    def render(self, request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        session: Session | None = request.scope.get("console.session")
        context.setdefault("nav", name.split(".")[0].split("_")[0])
        return self.templates.TemplateResponse(
            request,
            name,
            {
                "session": session,
                "csrf": session.csrf if session else "",
                "request_id": request.state.request_id,
                **context,
            },
            status_code=status,
        )

    async def not_found(self, request: Request) -> HTMLResponse:
        """The one 404 page: it never echoes the id that was asked for."""
        return self.render(request, "not_found.html", status=404, nav="")

    async def _not_found_handler(self, request: Request, exc) -> Response:
        if not hasattr(request.state, "request_id"):
            request.state.request_id = uuid.uuid4().hex
        sid = request.cookies.get(COOKIE)
        session = self._sessions.get(sid) if self._sessions else None
        if session is None:  # a signed-out visitor learns nothing, not even which paths exist
            return _to_signin(request)
        request.scope["console.session"] = session
        return await self.not_found(request)

    def _page(self, handler: Callable[..., Awaitable[Response]], *, operator: bool = False):
        """Require a live session (else sign in), a CSRF token on POST, and map RPC failures to pages.

        operator: the page also serves operator sessions (all others tell an operator what they can see).
        """

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            session = self.sessions.get(request.cookies.get(COOKIE))
            if session is None:
                return _to_signin(request)
            request.scope["console.session"] = session
            _request_id.set(request.state.request_id)
            if request.method == "POST":
                form = await request.form()
                if not session.check_csrf(str(form.get("csrf") or request.headers.get("x-csrf-token") or "")):
                    return PlainTextResponse("refused: missing or wrong CSRF token", status_code=403)
            if session.operator and not operator:
                return self.render(request, "operator_only.html", status=403, nav="")
            try:
                return await handler(request, session)
            except NotFound:
                return await self.not_found(request)
            except PickTenant:
                return RedirectResponse("/tenants", status_code=303)
            except SignedOut:
                await self.sessions.sign_out(session)
                return _to_signin(request)
            except ValueError as exc:
                return self.render(request, "error.html", status=400, nav="", message=f"bad request: {exc}")
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                    await self.sessions.sign_out(session)
                    return _to_signin(request)
                log.warning(
                    "mesh call failed",
                    extra={
                        "tenant_id": session.tenant_id,
                        "reason": err.code().name,
                        "request_id": request.state.request_id,
                    },
                )
                return self.render(request, "error.html", status=502, nav="", message=describe_error(err))

        return endpoint

    async def _call(self, session: Session, method, request, *, timeout: float = 15, ids: bool = False):
        """One RPC as the session's tenant; with ids=True, a refusal about an id is the 404 page."""
        try:
            return await method(
                request, metadata=await self.sessions.metadata(session, _request_id.get()), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            if ids and err.code() in _NOT_FOUND_CODES:
                raise NotFound from None
            raise

    # --- sign-in ----------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        session = self.sessions.get(request.cookies.get(COOKIE))
        return RedirectResponse(_landing(session), status_code=303)

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def signin_form(self, request: Request, error: str = "", status: int = 200) -> Response:
        if error == "" and (session := self.sessions.get(request.cookies.get(COOKIE))):
            return RedirectResponse(_landing(session), status_code=303)
        # Login CSRF: the form must echo the cookie's value. Reuse a cookie already set, so a second load
        # (another tab, a favicon fetch redirected here) does not invalidate the first form.
        pre = request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(24)
        resp = self.render(request, "signin.html", status=status, nav="", signin_csrf=pre, error=error)
        resp.set_cookie(
            PRE_COOKIE, pre, httponly=True, samesite="strict", secure=_https(request), path="/signin", max_age=3600
        )
        return resp

    async def signin(self, request: Request) -> Response:
        form = await request.form()
        pre = request.cookies.get(PRE_COOKIE, "")
        offered = str(form.get("csrf") or "")
        if not pre or not secrets.compare_digest(pre, offered):
            return PlainTextResponse("refused: missing or wrong CSRF token", status_code=403)
        api_key = str(form.get("api_key") or "").strip()
        if not api_key:
            return await self.signin_form(request, error="enter an API key", status=400)
        try:
            session = await self.sessions.sign_in(api_key)
        except SignInFailed as exc:
            return await self.signin_form(request, error=str(exc), status=401)
        except grpc.aio.AioRpcError as err:
            return await self.signin_form(request, error=describe_error(err), status=502)
        resp = RedirectResponse(_landing(session), status_code=303)
        resp.set_cookie(COOKIE, session.sid, httponly=True, samesite="strict", secure=_https(request), path="/")
        resp.delete_cookie(PRE_COOKIE, path="/signin")
        return resp

    async def signout(self, request: Request, session: Session) -> Response:
        await self.sessions.sign_out(session)
        resp = RedirectResponse("/signin", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # --- overview ---------------------------------------------------------------------------------

    async def _list_runs(
        self,
        session: Session,
        *,
        since: dt.datetime | None = None,
        status: orc.RunStatus = orc.RUN_STATUS_UNSPECIFIED,
        team: str = "",
        limit: int = MAX_RUNS_SCANNED,
    ) -> list[orc.Run]:
        """Runs newest first, down to `since` (or `limit` runs)."""
        runs: list[orc.Run] = []
        if limit <= 0:
            return runs

        def page(token: str) -> Awaitable[orc.ListRunsResponse]:  # no more than the runs still wanted
            request = orc.ListRunsRequest(
                page_size=min(RUNS_PAGE, limit - len(runs)), page_token=token, status=status, team=team
            )
            return self._call(session, self.mesh.orchestrator.ListRuns, request)

        async for resp in pages(page):
            for r in resp.runs:
                created = _dt(r.create_time)
                if since is not None and created is not None and created < since:
                    return runs
                runs.append(r)
            if len(runs) >= limit:
                break
        return runs[:limit]

    async def _query_usage(
        self,
        session: Session,
        start: dt.datetime,
        end: dt.datetime,
        group_by: list[mtr.UsageGrouping],
        *,
        model: str = "",
        agent: str = "",
    ) -> list[mtr.UsageRow]:
        rows: list[mtr.UsageRow] = []
        flt = mtr.UsageFilter(start_time=_ts(start), end_time=_ts(end), model=model, agent_id=agent)
        if session.operator and not session.acting_for:
            raise PickTenant

        def page(token: str) -> Awaitable[mtr.QueryTenantUsageResponse | mtr.QueryUsageResponse]:
            if session.operator:  # metering audits every call, under the page's request id
                return self._call(
                    session,
                    self.mesh.metering.QueryTenantUsage,
                    mtr.QueryTenantUsageRequest(
                        tenant_id=session.acting_for, filter=flt, group_by=group_by, page_size=1000, page_token=token
                    ),
                )
            return self._call(
                session,
                self.mesh.metering.QueryUsage,
                mtr.QueryUsageRequest(filter=flt, group_by=group_by, page_size=1000, page_token=token),
            )

        async for resp in pages(page):
            rows += resp.rows
        return rows

    async def _steps(self, session: Session, run_id: str, *, live: bool = False) -> list[orc.Step]:
        """A run's steps from WatchRun: a finished run's stream ends by itself; a live one is read for a moment."""
        steps: list[orc.Step] = []
        call = self.mesh.orchestrator.WatchRun(
            orc.WatchRunRequest(run_id=run_id),
            metadata=await self.sessions.metadata(session, _request_id.get()),
            timeout=0.8 if live else 15,
        )
        try:
            async for msg in call:
                steps.append(msg.step)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and live:
                return steps
            if err.code() in _NOT_FOUND_CODES:
                raise NotFound from None
            raise
        return steps

    async def _run_stats(self, session: Session, start: dt.datetime, end: dt.datetime) -> list[orc.AgentRunStats]:
        """Per-agent run counts and exact step-latency percentiles, computed by the orchestrator."""
        return list(
            (
                await self._call(
                    session,
                    self.mesh.orchestrator.GetRunStats,
                    orc.GetRunStatsRequest(start_time=_ts(start), end_time=_ts(end)),
                )
            ).agents
        )

    async def overview_data(self, session: Session, window: str) -> dict:
        """Every Overview figure for one window, from GetRunStats, QueryUsage, GetQuotaStatus and ListRuns (failed)."""
        now = dt.datetime.now(dt.UTC)
        start = now - WINDOWS[window]
        end = now + dt.timedelta(minutes=1)
        stats, usage, quota, failed = await asyncio.gather(
            self._run_stats(session, start, end),
            self._query_usage(session, start, end, [mtr.USAGE_GROUPING_AGENT, mtr.USAGE_GROUPING_MODEL]),
            self._call(session, self.mesh.metering.GetQuotaStatus, mtr.GetQuotaStatusRequest()),
            self._list_runs(session, since=start, status=orc.RUN_STATUS_FAILED, limit=REFUSALS_SCANNED),
        )
        by_agent, by_model = _figures.roll_up(usage, "agent"), _figures.roll_up(usage, "model")
        agents = _figures.agent_figures(by_agent, stats)
        counts = _figures.stats_status_counts(stats)
        budgets = _figures.budget_figures(quota)
        label = lambda a: a.agent or "(no agent)"  # noqa: E731
        charts = {
            "uptime": _charts.bars(
                f"Model calls that succeeded per agent, last {window}",
                [(label(a), a.uptime or 0.0) for a in agents if a.calls],
                unit="%",
                max_value=100,
            ),
            "errors": _charts.bars(
                f"Error rate per agent, last {window}",
                [(label(a), a.error_rate or 0.0) for a in agents if a.calls],
                unit="%",
                max_value=100,
            ),
            "latency": _charts.bars(
                f"Step latency per agent (p50 and p95), last {window}",
                [(label(a), 0) for a in agents if a.latency_steps],
                unit="ms",
                series=("p50", "p95"),
                values=[[a.p50_ms or 0, a.p95_ms or 0] for a in agents if a.latency_steps],
            ),
            "runs": _charts.bars(f"Runs by status, last {window}", list(counts.items())),
            "spend": _charts.bars(
                f"Spend per model, last {window}",
                [(r.model, float(Decimal(r.cost_usd or "0"))) for r in by_model],
                unit="$",
            ),
            "budgets": [
                _charts.meter(
                    f"{b.unit} budget per {b.period} ({b.mode})",
                    b.used,
                    b.held,
                    b.limit,
                    unit="$" if b.unit == "usd" else "tokens",
                )
                for b in budgets
            ],
        }
        return {
            "window": window,
            "runs": sum(counts.values()),
            "agents": agents,
            "budgets": budgets,
            "charts": charts,
            "running": sum(s.running_now for s in stats),
            "queued": sum(s.queued_now for s in stats),
            "refusals": _figures.quota_refusals(failed)[:20],
            "latency_steps": sum(a.latency_steps for a in agents),
            "spend": _figures.usd(_figures.total_cost(by_model)),
            "calls": sum(r.event_count for r in by_model),
            "errors": sum(r.error_count for r in by_model),
            "counts": counts,
        }

    async def overview(self, request: Request, session: Session) -> Response:
        window = request.query_params.get("window", "24h")
        if window not in WINDOWS:
            window = "24h"
        return self.render(request, "overview.html", **await self.overview_data(session, window))

    async def overview_live(self, request: Request, session: Session) -> Response:
        now = dt.datetime.now(dt.UTC)  # running_now/queued_now count runs started at any time; the window is moot
        stats = await self._run_stats(session, now - dt.timedelta(minutes=1), now)
        return self.render(
            request, "_live.html", running=sum(s.running_now for s in stats), queued=sum(s.queued_now for s in stats)
        )

    # --- runs -------------------------------------------------------------------------------------

    def _run_filters(self, request: Request) -> tuple[str, str]:
        status = request.query_params.get("status", "")
        if status and status not in ("queued", "running", "succeeded", "failed", "cancelled"):
            status = ""
        return status, request.query_params.get("team", "")[:100]

    async def _runs_page(self, session: Session, status: str, team: str) -> list[orc.Run]:
        value = getattr(orc, f"RUN_STATUS_{status.upper()}") if status else orc.RUN_STATUS_UNSPECIFIED
        return await self._list_runs(session, status=value, team=team, limit=100)

    async def runs(self, request: Request, session: Session) -> Response:
        status, team = self._run_filters(request)
        teams = await self._call(session, self.mesh.orchestrator.ListTeams, orc.ListTeamsRequest(page_size=200))
        return self.render(
            request,
            "runs.html",
            runs=await self._runs_page(session, status, team),
            status_filter=status,
            team=team,
            teams=[t.name for t in teams.teams],
        )

    async def runs_table(self, request: Request, session: Session) -> Response:
        status, team = self._run_filters(request)
        return self.render(request, "_runs_table.html", runs=await self._runs_page(session, status, team))

    async def _timeline(self, session: Session, run_id: str) -> dict:
        run = (await self._call(session, self.mesh.orchestrator.GetRun, orc.GetRunRequest(run_id=run_id), ids=True)).run
        live = run.status in (orc.RUN_STATUS_QUEUED, orc.RUN_STATUS_RUNNING)
        steps = await self._steps(session, run_id, live=live)
        prices = await self._prices(session)
        rows: list[dict[str, Any]] = []
        tokens_in, tokens_out, cost = 0, 0, Decimal(0)
        for step in steps:
            detail = _struct_dict(step.detail)
            usage = detail.get("usage") or {}
            row: dict[str, Any] = {
                "step": step,
                "detail": detail,
                "input": int(usage.get("input_tokens") or 0),
                "output": int(usage.get("output_tokens") or 0),
                "cost": None,
            }
            if step.kind == orc.STEP_KIND_MODEL_CALL:
                row["cost"] = _cost(prices.get(str(detail.get("model", ""))), usage)
                tokens_in += row["input"]
                tokens_out += row["output"]
                cost += row["cost"] or 0
            rows.append(row)
        return {"run": run, "rows": rows, "live": live, "tokens_in": tokens_in, "tokens_out": tokens_out, "cost": cost}

    async def _prices(self, session: Session) -> dict[str, mtr.Price]:
        """model -> the price in force now (for a model call's cost on the timeline)."""
        try:
            resp = await self._call(session, self.mesh.metering.ListPrices, mtr.ListPricesRequest(page_size=500))
        except grpc.aio.AioRpcError:
            return {}
        now = time.time()
        best: dict[str, mtr.Price] = {}
        for p in resp.prices:
            if p.effective_time.seconds <= now and (
                p.model not in best or p.effective_time.seconds > best[p.model].effective_time.seconds
            ):
                best[p.model] = p
        return best

    async def run(self, request: Request, session: Session) -> Response:
        return self.render(
            request,
            "run.html",
            nav="runs",
            jaeger_url=self.config.jaeger_url,
            **await self._timeline(session, request.path_params["run_id"]),
        )

    async def run_timeline(self, request: Request, session: Session) -> Response:
        return self.render(request, "_timeline.html", **await self._timeline(session, request.path_params["run_id"]))

    async def cancel_run(self, request: Request, session: Session) -> Response:
        run_id = request.path_params["run_id"]
        try:
            await self._call(session, self.mesh.orchestrator.CancelRun, orc.CancelRunRequest(run_id=run_id), ids=True)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:  # already finished: show it as it is
                raise
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    # --- threads (state's event logs: metadata only, never payloads) ------------------------------

    async def threads(self, request: Request, session: Session) -> Response:
        run = request.query_params.get("run", "")[:100]
        page = request.query_params.get("page", "")[:500]
        resp = await self._call(
            session,
            self.mesh.state.ListThreads,
            st.ListThreadsRequest(run_id=run, page_size=THREADS_PAGE, page_token=page),
        )
        return self.render(request, "threads.html", threads=resp.threads, run=run, next_page=resp.next_page_token)

    async def thread(self, request: Request, session: Session) -> Response:
        thread_id = request.path_params["thread_id"]
        thread = (
            await self._call(session, self.mesh.state.GetThread, st.GetThreadRequest(thread_id=thread_id), ids=True)
        ).thread
        resp = await self._call(
            session,
            self.mesh.state.ReadEvents,
            st.ReadEventsRequest(thread_id=thread_id, page_size=THREAD_EVENTS),
            ids=True,
        )
        # Sizes only: a payload is the tenant's own, but a page is easier to leak than an RPC answer.
        events = [
            {"version": e.version, "type": e.type, "time": fmt_time(e.create_time), "size": len(e.payload)}
            for e in resp.events
        ]
        return self.render(
            request, "thread.html", nav="threads", thread=thread, events=events, more=bool(resp.next_page_token)
        )

    # --- operators: pick a tenant (usage only, through audited operator RPCs) -------------------------

    async def _tenant_list(self, session: Session) -> list[idp.Tenant]:
        tenants: list[idp.Tenant] = []
        async for resp in pages(
            lambda token: self._call(
                session, self.mesh.identity.ListTenants, idp.ListTenantsRequest(page_size=500, page_token=token)
            )
        ):
            tenants += [t for t in resp.tenants if t.id != PLATFORM_TENANT]
        return tenants

    async def tenants(self, request: Request, session: Session) -> Response:
        if not session.operator:
            raise NotFound
        return self.render(request, "tenants.html", tenants=await self._tenant_list(session))

    async def pick_tenant(self, request: Request, session: Session) -> Response:
        if not session.operator:
            raise NotFound
        wanted = str((await request.form()).get("tenant_id") or "")
        match = [t for t in await self._tenant_list(session) if t.id == wanted]
        if not match:
            raise ValueError("pick one of the listed tenants")
        session.acting_for, session.acting_for_name = match[0].id, match[0].name
        return RedirectResponse("/usage", status_code=303)

    # --- usage ------------------------------------------------------------------------------------

    def _usage_params(self, request: Request) -> tuple[dt.datetime, dt.datetime, list[str]]:
        now = dt.datetime.now(dt.UTC)
        start = parse_when(
            request.query_params.get("since"), now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        )
        end = parse_when(request.query_params.get("until"), now)
        if end <= start:
            raise ValueError("until must be after since")
        names = [n.strip() for n in request.query_params.get("by", "day,model,agent").split(",") if n.strip()]
        unknown = [n for n in names if n not in _GROUPINGS]
        if unknown:
            raise ValueError(f"cannot group by {', '.join(unknown)}")
        return start, end, names

    async def usage(self, request: Request, session: Session) -> Response:
        start, end, names = self._usage_params(request)
        fine = [mtr.USAGE_GROUPING_DAY, mtr.USAGE_GROUPING_MODEL, mtr.USAGE_GROUPING_AGENT]
        wanted = [_GROUPINGS[n] for n in names]
        if wanted == fine:  # the default: one scan of the ledger serves the charts and the lines
            rows = parts = await self._query_usage(session, start, end, fine)
        else:
            rows, parts = await asyncio.gather(
                self._query_usage(session, start, end, wanted), self._query_usage(session, start, end, fine)
            )
        by_day, by_model, by_agent = (
            _figures.roll_up(parts, "day"),
            _figures.roll_up(parts, "model"),
            _figures.roll_up(parts, "agent"),
        )

        def tokens(r: mtr.UsageRow) -> int:
            t = r.tokens
            return t.input_tokens + t.output_tokens + t.cache_write_tokens + t.cache_read_tokens

        charts = {
            "day_cost": _charts.columns(
                "Cost per day (USD)",
                [(fmt_time(r.period_start)[:10], float(Decimal(r.cost_usd or "0"))) for r in by_day],
                unit="$",
            ),
            "day_tokens": _charts.columns(
                "Tokens per day", [(fmt_time(r.period_start)[:10], tokens(r)) for r in by_day]
            ),
            "model": _charts.bars(
                "Cost per model (USD)", [(r.model, float(Decimal(r.cost_usd or "0"))) for r in by_model], unit="$"
            ),
            "agent": _charts.bars("Tokens per agent", [(r.agent_id or "(no agent)", tokens(r)) for r in by_agent]),
        }
        # Encoded: a raw "+00:00" would arrive as " 00:00" and the download would fail.
        csv_query = urllib.parse.urlencode(
            {"since": start.isoformat(), "until": end.isoformat(), "by": ",".join(names)}
        )
        return self.render(
            request,
            "usage.html",
            charts=charts,
            headers=QUERY_HEADERS,
            lines=query_rows(rows, hourly="hour" in names),
            since=start.isoformat(),
            until=end.isoformat(),
            by=",".join(names),
            csv_query=csv_query,
            total=_figures.usd(_figures.total_cost(by_model)),
            calls=sum(r.event_count for r in by_model),
        )

    async def usage_csv(self, request: Request, session: Session) -> Response:
        start, end, names = self._usage_params(request)
        rows = await self._query_usage(session, start, end, [_GROUPINGS[n] for n in names])
        return Response(
            usage_csv(query_rows(rows, hourly="hour" in names)),
            media_type="text/csv",
            headers={"content-disposition": 'attachment; filename="usage.csv"'},
        )

    # --- secrets and security ---------------------------------------------------------------------

    async def _events(self, session: Session, secret_name: str = "", limit: int = 200) -> list[cred.AccessEvent]:
        events: list[cred.AccessEvent] = []
        token = ""
        while True:
            resp = await self._call(
                session,
                self.mesh.credentials.ListAccessEvents,
                cred.ListAccessEventsRequest(page_size=500, page_token=token, secret_name=secret_name),
            )
            events += resp.events
            token = resp.next_page_token
            if not token:
                break
        return events[-limit:][::-1]  # newest first

    async def secrets(self, request: Request, session: Session) -> Response:
        listed: list[cred.Secret] = []
        token = ""
        while True:
            resp = await self._call(
                session, self.mesh.credentials.ListSecrets, cred.ListSecretsRequest(page_size=500, page_token=token)
            )
            listed += resp.secrets
            token = resp.next_page_token
            if not token:
                break
        verify, events = await asyncio.gather(
            self._call(session, self.mesh.credentials.VerifyAccessEvents, cred.VerifyAccessEventsRequest()),
            self._events(session, limit=50),
        )
        return self.render(
            request,
            "secrets.html",
            secrets=[_secret_row(s) for s in listed],
            verify=verify,
            events=[_event_row(e) for e in events],
        )

    async def secret(self, request: Request, session: Session) -> Response:
        name = request.path_params["name"]
        s = (
            await self._call(
                session, self.mesh.credentials.DescribeSecret, cred.DescribeSecretRequest(name=name), ids=True
            )
        ).secret
        events = await self._events(session, secret_name=name, limit=100)
        versions = [
            {
                "version": v.version,
                "state": enum_name(cred.SecretVersionState, v.state, "SECRET_VERSION_STATE_"),
                "created": fmt_time(v.create_time),
                "expires": fmt_time(v.expire_time),
                "by": v.created_by,
                "origin": v.origin,
            }
            for v in s.versions
        ]
        return self.render(
            request,
            "secret.html",
            nav="secrets",
            secret=_secret_row(s),
            versions=versions,
            events=[_event_row(e) for e in events],
        )

    async def _security_events(
        self, session: Session, start: dt.datetime, end: dt.datetime
    ) -> tuple[list[sec.SecurityEvent], list[str]]:
        """The tenant's refused calls from every service's own ledger (ListSecurityEvents), and the services
        that could not answer (the page shows the others and names those)."""

        async def one(service: str, stub) -> list[sec.SecurityEvent]:
            events: list[sec.SecurityEvent] = []
            token = ""
            for _ in range(SECURITY_PAGES):
                resp = await self._call(
                    session,
                    stub.ListSecurityEvents,
                    sec.ListSecurityEventsRequest(
                        start_time=_ts(start), end_time=_ts(end), page_size=500, page_token=token
                    ),
                )
                events += resp.events
                token = resp.next_page_token
                if not token:
                    break
            return events

        stubs = self.mesh.security_events
        answers = await asyncio.gather(*(one(svc, stub) for svc, stub in stubs.items()), return_exceptions=True)
        events: list[sec.SecurityEvent] = []
        missing: list[str] = []
        for svc, answer in zip(stubs, answers, strict=True):
            if isinstance(answer, grpc.aio.AioRpcError) and answer.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise answer  # the session's token is gone: sign in again
            if isinstance(answer, BaseException):
                if not isinstance(answer, grpc.aio.AioRpcError):
                    raise answer
                log.warning(
                    "security events unavailable",
                    extra={"service": svc, "reason": answer.code().name, "request_id": _request_id.get()},
                )
                missing.append(svc)
                continue
            events += answer
        return events, missing

    async def security(self, request: Request, session: Session) -> Response:
        window = request.query_params.get("window", "24h")
        if window not in WINDOWS:
            window = "24h"
        now = dt.datetime.now(dt.UTC)
        week = now - WINDOWS["7d"]
        (refusals, missing), events, runs = await asyncio.gather(
            self._security_events(session, week, now + dt.timedelta(minutes=1)),
            self._events(session, limit=2000),
            self._list_runs(session, since=week, status=orc.RUN_STATUS_FAILED, limit=REFUSALS_SCANNED),
        )
        refused = [_event_row(e) for e in events if e.outcome == cred.ACCESS_OUTCOME_DENIED]
        blocked = [
            r
            for r in runs
            if r.error_reason in ("OUTPUT_BLOCKED", "UNAUTHENTICATED", "PERMISSION_DENIED", "TOKEN_REVOKED")
        ]
        figures = _security_figures(refusals, now, window)
        return self.render(
            request,
            "security.html",
            refused=refused[:100],
            quota=_figures.quota_refusals(runs)[:50],
            blocked=blocked[:50],
            window=window,
            missing=missing,
            **figures,
        )

    # --- keys -------------------------------------------------------------------------------------

    async def _key_rows(self, session: Session) -> list[dict]:
        keys: list[idp.ApiKey] = []
        token = ""
        while True:
            resp = await self._call(
                session, self.mesh.identity.ListApiKeys, idp.ListApiKeysRequest(page_size=500, page_token=token)
            )
            keys += resp.api_keys
            token = resp.next_page_token
            if not token:
                break
        return [
            {
                "id": k.id,
                "principal": k.principal_id,
                "name": k.display_name,
                "scopes": " ".join(k.scopes),
                "prefix": k.prefix,
                "created": fmt_time(k.create_time),
                "last_used": fmt_time(k.last_used_time),
                "revoked": bool(k.revoke_time.seconds),
            }
            for k in keys
        ]

    async def keys(self, request: Request, session: Session, created: dict | None = None) -> Response:
        return self.render(request, "keys.html", keys=await self._key_rows(session), created=created)

    async def create_key(self, request: Request, session: Session) -> Response:
        form = await request.form()
        name = str(form.get("name") or "console").strip()[:100] or "console"
        scopes = [s for s in str(form.get("scopes") or "").split() if s]
        principal = await self._call(
            session,
            self.mesh.identity.CreatePrincipal,
            idp.CreatePrincipalRequest(
                kind=idp.PRINCIPAL_KIND_SERVICE_ACCOUNT, display_name=name, scopes=scopes or ["*"]
            ),
        )
        resp = await self._call(
            session,
            self.mesh.identity.CreateApiKey,
            idp.CreateApiKeyRequest(principal_id=principal.principal.id, scopes=scopes, display_name=name),
        )
        page = await self.keys(request, session, created={"id": resp.api_key.id, "secret": resp.secret})
        page.headers["cache-control"] = "no-store"  # the secret is shown once: keep it out of caches
        return page

    async def revoke_key(self, request: Request, session: Session) -> Response:
        await self._call(
            session,
            self.mesh.identity.RevokeApiKey,
            idp.RevokeApiKeyRequest(api_key_id=request.path_params["key_id"]),
            ids=True,
        )
        return RedirectResponse("/keys", status_code=303)


def usage_csv(rows: list[list[str]]) -> str:
    """The CSV `bulkhead usage query --csv` writes for the same rows (same headers, same csv dialect)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(QUERY_HEADERS)
    writer.writerows(rows)
    return buf.getvalue()


def _security_figures(events: list[sec.SecurityEvent], now: dt.datetime, window: str) -> dict:
    """The Security page's figures from the services' refused-call ledgers: totals, charts and table lines."""
    day_ago, start = (now - WINDOWS["24h"]).timestamp(), (now - WINDOWS[window]).timestamp()
    by_reason: dict[str, list[int]] = {}
    slot_s = 3600 if window == "24h" else 86400
    first_slot = int(start // slot_s) * slot_s
    slots = {first_slot + i * slot_s: 0 for i in range(int((now.timestamp() - first_slot) // slot_s) + 1)}
    lines: dict[tuple[str, str, str, str], list[int]] = {}
    for e in events:
        at = e.bucket_start_time.seconds
        counts = by_reason.setdefault(e.reason, [0, 0])
        counts[1] += e.count
        if at >= day_ago:
            counts[0] += e.count
        if at < start:
            continue
        slot = int(at // slot_s) * slot_s
        if slot in slots:
            slots[slot] += e.count
        line = lines.setdefault((e.service, e.method, e.reason, e.principal_id), [0, 0])
        line[0] += e.count
        line[1] = max(line[1], e.last_seen_time.seconds)
    reasons = sorted(by_reason, key=lambda r: (-by_reason[r][1], r))
    fmt = "%H:00" if window == "24h" else "%m-%d"
    charts = {
        "reasons": _charts.bars(
            "Refused calls by reason, last 24 h and last 7 d",
            [(r, 0) for r in reasons],
            series=("last 24 h", "last 7 d"),
            values=[by_reason[r] for r in reasons],
        ),
        "timeline": _charts.columns(
            f"Refused calls per {'hour' if window == '24h' else 'day'}, last {window}",
            [(dt.datetime.fromtimestamp(t, dt.UTC).strftime(fmt), n) for t, n in slots.items()]
            if any(slots.values())
            else [],
        ),
    }
    rows = sorted(lines.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:SECURITY_ROWS]
    table = [
        {
            "service": svc,
            "method": method.rsplit("/", 1)[-1],
            "path": method,
            "reason": reason,
            "principal": principal,
            "count": count,
            "last_seen": dt.datetime.fromtimestamp(last, dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        }
        for (svc, method, reason, principal), (count, last) in rows
    ]
    return {
        "charts": charts,
        "lines": table,
        "more_lines": max(0, len(lines) - len(table)),
        "total": sum(n for _, n in slots.items()),
        "total_24h": sum(c[0] for c in by_reason.values()),
        "total_7d": sum(c[1] for c in by_reason.values()),
    }


def _secret_row(s: cred.Secret) -> dict:
    period = s.rotation_period.seconds
    nxt = _dt(s.next_rotation_time)
    if not period:
        state = "manual (no schedule)"
    elif nxt and nxt < dt.datetime.now(dt.UTC):
        state = "overdue"
    else:
        state = "scheduled"
    return {
        "name": s.name,
        "description": s.description,
        "version": s.current_version,
        "period": f"{period}s" if period else "",
        "next": fmt_time(s.next_rotation_time),
        "state": state,
        "rotator": s.rotator,
        "updated": fmt_time(s.update_time),
        "last_access": fmt_time(s.last_access_time),
        "deleted": bool(s.delete_time.seconds),
    }


def _event_row(e: cred.AccessEvent) -> dict:
    return {
        "seq": e.sequence,
        "time": fmt_time(e.time),
        "principal": e.principal_id,
        "agent": e.agent_id,
        "run": e.run_id,
        "action": enum_name(cred.AccessAction, e.action, "ACCESS_ACTION_"),
        "secret": e.secret_name,
        "version": e.version or "",
        "outcome": enum_name(cred.AccessOutcome, e.outcome, "ACCESS_OUTCOME_"),
        "reason": e.reason,
    }


def _struct_dict(struct) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(struct) if struct.fields else {}


def _cost(price: mtr.Price | None, usage: dict) -> Decimal | None:
    if price is None:
        return None
    micros = (
        int(usage.get("input_tokens") or 0) * price.input_micros_per_mtok
        + int(usage.get("output_tokens") or 0) * price.output_micros_per_mtok
        + int(usage.get("cache_creation_input_tokens") or 0) * price.cache_write_micros_per_mtok
        + int(usage.get("cache_read_input_tokens") or 0) * price.cache_read_micros_per_mtok
    )
    return Decimal(micros) / Decimal(10**12)


def _landing(session: Session | None) -> str:
    """Where a signed-in browser starts: a tenant's Overview, or an operator's tenant picker."""
    if session is not None and session.operator:
        return "/usage" if session.acting_for else "/tenants"
    return "/overview"


def _https(request: Request) -> bool:
    return request.url.scheme == "https"


def _to_signin(request: Request) -> Response:
    if request.headers.get("hx-request"):  # htmx swaps would paste the sign-in page into a fragment
        return Response(status_code=401, headers={"hx-redirect": "/signin"})
    return RedirectResponse("/signin", status_code=303)


class _Headers:
    """Request id on every request; strict security headers on every response."""

    CSP = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-request-id", request_id.encode()),
                    (b"content-security-policy", self.CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                if not any(k == b"cache-control" for k, _ in headers) and not scope["path"].startswith("/static"):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(config: ConsoleConfig | None = None, *, mesh: Mesh | None = None) -> Starlette:
    """The console as an ASGI app (config from the environment unless given)."""
    return Console(config or ConsoleConfig.from_env(), mesh).app()
