"""The dashboard's routes and login in memory (httpx + ASGI, a fake Operator, no browser)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from test_control import AUTH, BASE, TOKEN, FakeOperator

from silomesh.peer.control import make_app
from silomesh.peer.dashboard.pages import PAGES, live_snapshot
from silomesh.peer.dashboard.sessions import CODE_TTL_SECONDS, SESSION_TTL_SECONDS, Sessions

COOKIE = "silomesh_session_8787"


@pytest.fixture
def operator(tmp_path: Path) -> FakeOperator:
    return FakeOperator(tmp_path)


def _client(operator: FakeOperator, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    app = make_app(operator, TOKEN)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE, headers=headers or {})


async def _login(client: httpx.AsyncClient) -> str:
    """Log ``client`` in the way a browser does; returns the page's CSRF token."""
    code = await client.post("/api/dashboard/login-code", headers=AUTH)
    assert code.status_code == 201
    response = await client.get(code.json()["path"])
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/"
    page = await client.get("/dashboard/")
    marker = 'name="csrf-token" content="'
    start = page.text.index(marker) + len(marker)
    return page.text[start : page.text.index('"', start)]


async def test_dashboard_page_without_a_session_is_refused_with_a_login_hint(operator: FakeOperator) -> None:
    async with _client(operator) as client:
        response = await client.get("/dashboard/models")
    assert response.status_code == 401
    assert "silomesh peer dashboard --config" in response.text
    assert "baseline" not in response.text


async def test_login_code_sets_an_httponly_strict_cookie_and_works_once(operator: FakeOperator) -> None:
    async with _client(operator) as client:
        path = (await client.post("/api/dashboard/login-code", headers=AUTH)).json()["path"]
        first = await client.get(path)
        cookie = first.headers["set-cookie"].lower()
        assert first.status_code == 303
        assert cookie.startswith(COOKIE + "=") and "httponly" in cookie and "samesite=strict" in cookie
        assert (await client.get("/dashboard/")).status_code == 200
        client.cookies.clear()
        again = await client.get(path)
    assert again.status_code == 401 and "unknown, already used or expired" in again.text


async def test_login_code_needs_the_bearer_token_not_a_session(operator: FakeOperator) -> None:
    async with _client(operator) as client:
        assert (await client.post("/api/dashboard/login-code")).status_code == 401
        csrf = await _login(client)
        minted = await client.post("/api/dashboard/login-code", headers={"X-CSRF-Token": csrf})
    assert minted.status_code == 401


async def test_every_page_renders_from_the_operator_with_security_headers(operator: FakeOperator) -> None:
    async with _client(operator) as client:
        await _login(client)
        for sub, _template, title in PAGES:
            response = await client.get("/dashboard" + sub)
            assert response.status_code == 200, sub
            assert f"<h1>{title}</h1>" in response.text
            assert "script-src 'self'" in response.headers["content-security-policy"]
            assert response.headers["x-frame-options"] == "DENY"
        models = (await client.get("/dashboard/models")).text
        audit = (await client.get("/dashboard/audit")).text
        neighbours = (await client.get("/dashboard/neighbours")).text
        overview = (await client.get("/dashboard/")).text
    assert "baseline" in models and "aa" * 8 in models
    # how each neighbour is reached, and how often its link came back (issue 14)
    assert "relayed, 12.3 ms, 2 reconnects" in neighbours and "relayed, 12.3 ms, 2 reconnects" in overview
    assert "received" in audit and ("audit", (200,)) in operator.calls


async def test_session_state_change_without_the_csrf_token_is_refused(operator: FakeOperator) -> None:
    async with _client(operator) as client:
        csrf = await _login(client)
        refused = await client.patch(f"/api/models/{'aa' * 32}", json={"name": "x"})
        wrong = await client.patch(f"/api/models/{'aa' * 32}", json={"name": "x"}, headers={"X-CSRF-Token": "nope"})
        accepted = await client.patch(f"/api/models/{'aa' * 32}", json={"name": "x"}, headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    assert wrong.status_code == 403
    assert accepted.status_code == 200 and accepted.json()["name"] == "x"


async def test_cross_site_post_with_a_session_and_csrf_token_is_refused(operator: FakeOperator) -> None:
    async with _client(operator) as client:
        csrf = await _login(client)
        response = await client.post(
            "/api/approvals/7",
            json={"approve": True},
            headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"},
        )
    assert response.status_code == 403
    assert operator.approvals_[0]["status"] == "pending"


async def test_logout_ends_the_session(operator: FakeOperator) -> None:
    async with _client(operator) as client:
        csrf = await _login(client)
        assert (await client.post("/dashboard/logout", headers={"X-CSRF-Token": csrf})).status_code == 200
        client.cookies.set(COOKIE, "stale")
        assert (await client.get("/dashboard/")).status_code == 401


async def test_static_assets_are_served_without_a_session(operator: FakeOperator) -> None:
    async with _client(operator) as client:
        chart = await client.get("/dashboard/static/vendor/chart-4.4.7.umd.min.js")
        script = await client.get("/dashboard/static/dashboard.js")
    assert chart.status_code == 200 and "Chart.js v4.4.7" in chart.text
    assert script.status_code == 200 and "EventSource" in script.text


async def test_audit_routes_call_the_operator(operator: FakeOperator) -> None:
    async with _client(operator, AUTH) as client:
        entries = await client.get("/api/audit", params={"limit": 1})
        bad = await client.get("/api/audit", params={"limit": "0"})
        report = await client.post("/api/audit/verify")
    assert entries.json() == [{"seq": 2, "direction": "sent", "kind": "delta"}]
    assert bad.status_code == 400
    assert report.json()["ok"] is True and ("verify_audit", ()) in operator.calls


async def test_live_snapshot_leaves_out_the_ever_changing_uptime(operator: FakeOperator) -> None:
    snapshot = await live_snapshot(operator)
    assert snapshot["status"]["round"] == 2
    assert [m["digest"] for m in snapshot["models"]] == ["aa" * 32, "bb" * 32]
    assert snapshot["neighbours"][0]["name"] == "st-x"
    assert snapshot["neighbours"][0]["reconnects"] == 2 and snapshot["neighbours"][0]["connection"] == "relayed"


def test_sessions_expire_and_codes_are_single_use() -> None:
    now = [0.0]
    sessions = Sessions(clock=lambda: now[0])
    stale, _ = sessions.new_code()
    now[0] += CODE_TTL_SECONDS + 1
    assert sessions.redeem(stale) is None
    code, _ = sessions.new_code()
    session = sessions.redeem(code)
    assert session is not None and sessions.redeem(code) is None
    assert sessions.get(session.session_id) == session
    now[0] += SESSION_TTL_SECONDS + 1
    assert sessions.get(session.session_id) is None
