"""The dashboard's address, authentication and roles (issue 15, item 5), against `trainwire dashboard` in a real
Chromium, with a store that governance filled (a run gates passed, requested for Staging by someone else)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from test_dashboard import APP, browser, chromium, serving, sidebar_run, text  # noqa: F401 (fixtures)
from test_governance import ingest, simulated_run

from trainwire.consumers.governance import Governance, RegistryError, Roles
from trainwire.dashboard.access import Access
from trainwire.dashboard.auth import SECRET_HEADER, Viewer
from trainwire.dashboard.serve import exposure_warning
from trainwire.infra.config import ConfigError, Settings, load_settings
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.producers.session import close_all

SECRET = "s3cret-shared-with-the-proxy-only"
ROLES = """
viewer = ["victor", "carol", "alice"]
requester = ["alice"]
approver = ["carol"]
auditor = ["carol"]
"""
PROXIED = {"TRAINWIRE_DASHBOARD_AUTH": "proxy", "TRAINWIRE_DASHBOARD_PROXY_SECRET": SECRET}


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two runs whose gates passed (Candidate), each requested for Staging by alice; a roles file in the home."""
    home = tmp_path_factory.mktemp("dashboard-auth")
    (home / "roles.toml").write_text(ROLES)
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("TRAINWIRE_")]:
            env.delenv(name)
        settings = Settings(home=home, batch_max_seconds=0.2)
        runs = [simulated_run(settings, tmp_path_factory.mktemp("run"), name=f"job-{i}") for i in range(2)]
        close_all()
        ingest(settings)
    client = connect_store(settings.store_dsn)
    try:
        governance = Governance(client, Roles.load(home / "roles.toml"))
        for run in runs:
            assert governance.registry_request(run.run_id, actor="alice")["stage"] == "Staging"
    finally:
        client.close()
    return home, [run.run_id for run in runs]


def store_state(home: Path, run_id: str) -> tuple[list[dict], list[dict]]:
    client = connect_store(f"chdb://{home}/chdb")
    try:
        reader = StoreReader(client)
        return reader.registry_history(run_id), reader.audit_log()
    finally:
        client.close()


# --- The listening address -------------------------------------------------------------------------------------------

def listening_addresses(port: int) -> set[str]:
    """The local addresses of sockets listening on `port`, from the kernel's tables."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words))
    return found


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def test_the_dashboard_listens_on_loopback_unless_told_and_warns_once_when_exposed_without_auth(tmp_path):
    with serving(tmp_path, "dashboard") as url:
        assert listening_addresses(port_of(url)) == {"127.0.0.1"}
    assert "warning" not in (tmp_path / f"server-{port_of(url)}.log").read_text()
    with serving(tmp_path, "dashboard", "--host", "0.0.0.0") as url:
        assert listening_addresses(port_of(url)) == {"0.0.0.0"}
    warnings = [line for line in (tmp_path / f"server-{port_of(url)}.log").read_text().splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 1 and "0.0.0.0 without authentication" in warnings[0], warnings


def test_exposure_warns_only_without_authentication_and_proxy_mode_needs_a_trust(monkeypatch):
    assert exposure_warning(Settings(dashboard_host="::1")) is None
    assert exposure_warning(Settings(dashboard_host="10.1.2.3")) is not None
    assert exposure_warning(Settings(dashboard_host="0.0.0.0", dashboard_auth="proxy",
                                     dashboard_proxy_secret=SECRET)) is None
    monkeypatch.setenv("TRAINWIRE_DASHBOARD_AUTH", "proxy")
    with pytest.raises(ConfigError, match="TRAINWIRE_DASHBOARD_AUTH: .*proxy needs TRAINWIRE_DASHBOARD_TRUSTED"):
        load_settings()
    monkeypatch.setenv("TRAINWIRE_DASHBOARD_TRUSTED_PROXIES", "10.0.0.0/8, ::1")
    assert [str(n) for n in load_settings().dashboard_trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    monkeypatch.setenv("TRAINWIRE_DASHBOARD_PROXY_SECRET", "short")
    with pytest.raises(ConfigError, match="TRAINWIRE_DASHBOARD_PROXY_SECRET"):
        load_settings()


# --- Authentication and roles in a browser ---------------------------------------------------------------------------

def page_text(page) -> str:
    main = page.inner_text('[data-testid="stMain"]')
    return f"sidebar run: {sidebar_run(page)!r}; page: {main!r}"


def shown(page, locator, timeout_ms: int = 30_000) -> None:
    """Wait for `locator`; on a timeout, fail with what the page showed instead."""
    try:
        locator.wait_for(timeout=timeout_ms)
    except PlaywrightTimeout:
        raise AssertionError(f"not shown in {timeout_ms / 1000:.0f} s: {locator}; {page_text(page)}") from None


def page_as(browser, url: str, run_id: str, **headers: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, extra_http_headers=headers)
    page.goto(f"{url}?run={run_id}")
    return page


def test_proxy_auth_refuses_strangers_and_lets_an_approver_approve_but_not_a_viewer(staged, browser):
    home, (run_id, _) = staged
    user = "X-Forwarded-User"
    with serving(home, "dashboard", env=PROXIED) as url:
        for headers in ({}, {user: "carol"}, {user: "carol", SECRET_HEADER: "a guess"}):
            page = page_as(browser, url, run_id, **headers)
            page.get_by_role("heading", name="Not authenticated").wait_for(timeout=30_000)
            page.wait_for_timeout(1_000)
            assert run_id[:8] not in page.content() and "job-0" not in page.content(), headers
            assert page.locator('[data-testid="stSidebarNav"]').count() == 0
            page.close()

        viewer = page_as(browser, url, run_id, **{user: "Victor", SECRET_HEADER: SECRET})
        viewer.get_by_role("heading", name="Fleet", exact=True).wait_for(timeout=30_000)
        nav = viewer.locator('[data-testid="stSidebarNav"]')
        assert nav.get_by_role("link", name="Training").count() == 1
        assert nav.get_by_role("link", name="Audit").count() == 0
        viewer.goto(f"{url}audit?run={run_id}")  # the Audit view's own address
        viewer.get_by_role("heading", name="Fleet", exact=True).wait_for(timeout=30_000)
        assert viewer.get_by_role("button", name="Approve for Production").count() == 0
        viewer.close()

        approver = page_as(browser, url, run_id, **{user: "carol", SECRET_HEADER: SECRET})
        approver.locator('[data-testid="stSidebarNav"]').get_by_role("link", name="Audit").click()
        shown(approver, approver.get_by_role("heading", name="Registry actions"))
        shown(approver, approver.get_by_text(f"job-0 · {run_id} · started"))
        # what the approver sees picked is what the button acts on (the page switch must not lose the URL's run)
        assert run_id[:8] in sidebar_run(approver), page_text(approver)
        approver.get_by_role("button", name="Approve for Production").click()
        shown(approver, approver.get_by_text(f"run {run_id}: Staging → Production by carol"))
        shown(approver, approver.get_by_text("Production since"))
        assert run_id[:8] in sidebar_run(approver), page_text(approver)
        approver.close()

    history, log = store_state(home, run_id)
    assert [(h["to_stage"], h["actor"]) for h in history][-2:] == [("Staging", "alice"), ("Production", "carol")]
    assert any(e["action"] == "registry.transition" and e["actor"] == "carol" and e["run_id"] == run_id
               and json.loads(e["details"])["to"] == "Production" for e in log)
    refused = [json.loads(e["details"]) for e in log if e["action"] == "dashboard.refused"]
    assert len(refused) == 3 and {r["claimed"] for r in refused} == {"", "carol"}
    logins = {(e["actor"], json.loads(e["details"])["method"]) for e in log if e["action"] == "dashboard.login"}
    assert logins == {("victor", "proxy"), ("carol", "proxy")}


def test_a_registry_call_without_the_approver_role_is_refused_and_logged(staged, monkeypatch):
    """What a forged button message would reach: refused by the dashboard without the role, and by governance
    (the roles file) for a viewer the dashboard wrongly believed."""
    from trainwire.dashboard.registry_actions import act

    home, (_, run_id) = staged
    monkeypatch.setenv("TRAINWIRE_HOME", str(home))
    try:
        with pytest.raises(PermissionError, match="victor does not hold the approver role"):
            act(Access(Viewer("victor", "proxy"), frozenset({"viewer"})), "approve", run_id, "")
        with pytest.raises(RegistryError, match="victor does not hold the approver role"):
            act(Access(Viewer("victor", "proxy"), frozenset({"viewer", "approver"})), "approve", run_id, "")
    finally:
        st.cache_resource.clear()  # let go of the store
    history, log = store_state(home, run_id)
    assert history[-1]["to_stage"] == "Staging"
    mine = [(e["actor"], e["action"]) for e in log if e["run_id"] == run_id][-2:]
    assert mine == [("victor", "dashboard.refused"), ("victor", "registry.refused")]


def test_oidc_shows_an_unauthenticated_session_only_the_login_prompt(staged, monkeypatch):
    home, (run_id, _) = staged
    monkeypatch.setenv("TRAINWIRE_HOME", str(home))
    monkeypatch.setenv("TRAINWIRE_DASHBOARD_AUTH", "oidc")
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": SECRET,
                          "client_id": "trainwire", "client_secret": "x",
                          "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}
    try:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert [b.label for b in at.button] == ["Log in"]
        assert text(at) == "Log in to see the dashboard." and not at.selectbox and not at.dataframe
    finally:
        st.cache_resource.clear()
