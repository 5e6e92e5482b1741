"""One mesh (`bulkhead up`, console included), the demo's two tenants, and one headless Chromium for the module."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bulkhead.client import Client
from bulkhead.credentials.v1 import credentials_pb2 as cred
from bulkhead.identity.v1 import identity_pb2 as idp
from shared.config import SERVICES, service_addr

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
"""Screenshots of every page, kept by CI as an artifact."""
_shots: list[Path] = []


def run(coro):
    """Run a coroutine to the end on a thread of its own (Playwright's sync API owns this thread's loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class Tenant:
    """One of the demo's tenants and what the tests planted in it."""

    name: str
    tenant_id: str
    api_key: str = field(repr=False)
    run_id: str
    secret_name: str = ""
    secret_value: str = field(default="", repr=False)
    key_id: str = ""


@dataclass
class Rig:
    """The running mesh, its console's URL and the two tenants."""

    mesh: object
    url: str
    addresses: dict[str, str]
    a: Tenant
    b: Tenant
    operator_key: str = field(repr=False)
    """The platform operator's key (`up` writes it to operator.key)."""
    verifier_key: str = field(repr=False)
    """A platform service's own key (scope platform.identity.verify: it may list revoked tokens)."""

    def client(self, tenant: Tenant | None):
        """A gRPC client acting as the tenant, or with the verifier key for None (use inside `run`)."""
        return Client.connect(api_key=tenant.api_key if tenant else self.verifier_key, addresses=self.addresses)


async def _plant(rig_addresses: dict[str, str], tenant: Tenant, secret_name: str) -> None:
    """A secret only this tenant has (its value must never reach a page) and the id of its admin key."""
    tenant.secret_name, tenant.secret_value = secret_name, "canary-" + secrets.token_hex(12)
    async with await Client.connect(api_key=tenant.api_key, addresses=rig_addresses) as bh:
        await bh.credentials.PutSecret(
            cred.PutSecretRequest(
                name=secret_name, value=tenant.secret_value.encode(), description="planted by the console tests"
            )
        )
        keys = await bh.identity.ListApiKeys(idp.ListApiKeysRequest(page_size=50))
        tenant.key_id = keys.api_keys[0].id


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """`bulkhead up` on free ports, then `bulkhead demo`'s scenario: tenants acme (A) and globex (B), one run each."""
    from bulkhead_cli.tour import run_demo
    from tests.e2e.conftest import start_mesh

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium chromium-driver (scripts/lib.sh ensure_chromium)")
    data_dir = tmp_path_factory.mktemp("console-mesh")
    mesh = start_mesh(data_dir)
    try:
        addresses = {svc: service_addr(svc, mesh.env) for svc in SERVICES}
        operator_key = (data_dir / "operator.key").read_text().strip()
        demo = run(run_demo(operator_key, addresses, say=lambda *_: None))
        a, b = (Tenant(t.name, t.tenant_id, t.api_key, t.run_id) for t in demo.tenants)
        assert {t.status for t in demo.tenants} == {"succeeded"}, demo
        run(_plant(addresses, a, "a-only-token"))
        run(_plant(addresses, b, "b-only-token"))
        verifier_key = next(data_dir.rglob("orchestrator.key")).read_text().strip()
        yield Rig(mesh, f"http://{mesh.env['BULKHEAD_CONSOLE_ADDR']}", addresses, a, b, operator_key, verifier_key)
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def sign_in(context, url: str, api_key: str, landing: str = "/overview"):
    """A page of `context` signed in with api_key through the sign-in form, as a person would."""
    page = context.new_page()
    page.goto(f"{url}/signin")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}{landing}")
    return page


@pytest.fixture(scope="module")
def signed_in(rig, browser):
    """One browser context signed in as tenant A for the module."""
    context = browser.new_context(base_url=rig.url, viewport={"width": 1280, "height": 900})
    page = sign_in(context, rig.url, rig.a.api_key)
    yield page
    context.close()


def shot(page, name: str) -> Path:
    """Save a full-page screenshot as a CI artifact."""
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    _shots.append(path)
    return path


def pytest_terminal_summary(terminalreporter):
    """Say where the screenshots are (CI uploads this folder)."""
    if _shots:
        terminalreporter.write_line(f"console screenshots ({len(_shots)} pages): {ARTIFACTS}")
