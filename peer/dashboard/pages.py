"""Dashboard routes: the login exchange, the Jinja2 pages and the live-update stream.

Pages are rendered on the server from the :class:`Operator`; the small script in
``static/dashboard.js`` performs actions by calling the control API's JSON routes with the
session cookie and the session's CSRF token, and keeps the page current from the
server-sent events of ``/dashboard/events``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from silomesh.peer.dashboard.sessions import SESSION_TTL_SECONDS, Sessions
from silomesh.peer.operator import Operator, OperatorError

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
LOGIN_PATH = "/dashboard/login"
STATIC_PREFIX = "/dashboard/static/"
#: seconds between looks at the peer's state for the live stream
POLL_SECONDS = 0.5
#: seconds between keep-alive comments on an idle stream
HEARTBEAT_SECONDS = 15.0
#: a stream ends after this long; the browser's EventSource reconnects by itself
STREAM_MAX_SECONDS = 30 * 60.0
#: most live streams open at once
MAX_STREAMS = 8
#: audit entries shown
AUDIT_ROWS = 200

#: the pages, in navigation order: (path below /dashboard, template, title)
PAGES = (
    ("/", "overview.html", "Overview"),
    ("/neighbours", "neighbours.html", "Neighbours"),
    ("/rounds", "rounds.html", "Rounds"),
    ("/models", "models.html", "Models"),
    ("/data", "data.html", "Data"),
    ("/approvals", "approvals.html", "Approvals"),
    ("/audit", "audit.html", "Audit"),
)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def cookie_name(request: Request) -> str:
    """The session cookie's name; cookies ignore ports, so each peer's port gets its own."""
    port = request.url.port
    return f"silomesh_session_{port}" if port else "silomesh_session"


def _when(value: object) -> str:
    if not isinstance(value, int | float) or value <= 0:
        return "—"
    return time.strftime("%m-%d %H:%M:%S", time.localtime(value))


def _short(value: object, n: int = 12) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= n else text[:n] + "…"


def _bytes(value: object) -> str:
    if not isinstance(value, int | float):
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def _link(n: dict[str, Any]) -> str:
    """How a neighbour is reached: "direct, 3.1 ms, 2 reconnects" ("—" when not connected)."""
    reconnects = int(n.get("reconnects") or 0)
    tail = f"{reconnects} reconnect{'s' if reconnects != 1 else ''}"
    if not n.get("connected"):
        return f"— ({tail})" if reconnects else "—"
    rtt = n.get("rtt_ms")
    parts = [str(n.get("connection") or "direct")]
    if isinstance(rtt, int | float):
        parts.append(f"{rtt:.1f} ms")
    return ", ".join([*parts, tail])


def make_environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), enable_async=False
    )
    env.filters["when"] = _when
    env.filters["short"] = _short
    env.filters["bytes"] = _bytes
    env.filters["link"] = _link
    return env


def login_needed(expired: bool = False) -> HTMLResponse:
    """The 401 page a browser sees without a valid session: how to get a login URL."""
    html = make_environment().get_template("login.html").render(expired=expired)
    return HTMLResponse(html, status_code=401, headers={**SECURITY_HEADERS, "WWW-Authenticate": "Bearer"})


async def live_snapshot(operator: Operator) -> dict[str, Any]:
    """What the live stream reports: the round and phase, the neighbours and the models."""
    status = await operator.status()
    status.pop("uptime_seconds", None)
    neighbours = [
        {k: n.get(k) for k in ("peer_id", "name", "connected", "selected", "samples", "refused", "last_seen",
                               "connection", "rtt_ms", "reconnects")}
        for n in await operator.neighbours()
    ]
    models = [{k: m.get(k) for k in ("digest", "name", "round")} for m in await operator.models()]
    return {"status": status, "neighbours": neighbours, "models": models}


def make_routes(operator: Operator, sessions: Sessions, jsonable: Callable[[Any], Any]) -> list[BaseRoute]:
    """The dashboard's routes (the control API's guard authenticates them)."""
    env = make_environment()
    open_streams = 0

    def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        session = sessions.get(request.cookies.get(cookie_name(request)))
        html = env.get_template(template).render(
            pages=PAGES,
            path=request.url.path,
            csrf=session.csrf if session else "",
            **context,
        )
        return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)

    def page(template: str, title: str, load: Callable[[], Awaitable[dict[str, Any]]]) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            try:
                context = await load()
                status = await operator.status()
                return render(request, template, title=title, status=jsonable(status), **jsonable(context))
            except OperatorError as exc:
                return render(request, "error.html", 400, title=title, status={}, message=str(exc))
            except Exception:
                logger.exception("dashboard: page %s failed", request.url.path)
                return render(request, "error.html", 500, title=title, status={}, message="internal error")

        return endpoint

    async def overview() -> dict[str, Any]:
        return {"live": await live_snapshot(operator)}

    async def neighbours() -> dict[str, Any]:
        return {"neighbours": await operator.neighbours()}

    async def rounds() -> dict[str, Any]:
        rows = await operator.rounds()
        names = sorted({k for r in rows for k in r.get("metrics", {})})
        return {"rounds": rows, "metric_names": names}

    async def models() -> dict[str, Any]:
        return {"models": await operator.models()}

    async def data() -> dict[str, Any]:
        return {"datasets": await operator.datasets()}

    async def approvals() -> dict[str, Any]:
        rows = await operator.approvals()
        return {
            "pending": [a for a in rows if a.get("status") == "pending"],
            "decided": [a for a in rows if a.get("status") != "pending"][::-1],
        }

    async def audit() -> dict[str, Any]:
        return {"entries": await operator.audit(AUDIT_ROWS), "limit": AUDIT_ROWS}

    loaders = {
        "/": overview,
        "/neighbours": neighbours,
        "/rounds": rounds,
        "/models": models,
        "/data": data,
        "/approvals": approvals,
        "/audit": audit,
    }

    async def login(request: Request) -> Response:
        session = sessions.redeem(request.query_params.get("code", ""))
        if session is None:
            return login_needed(expired=bool(request.query_params.get("code")))
        response = RedirectResponse("/dashboard/", status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            cookie_name(request),
            session.session_id,
            max_age=int(SESSION_TTL_SECONDS),
            path="/",
            httponly=True,
            samesite="strict",
        )
        logger.info("dashboard: a browser logged in")
        return response

    async def logout(request: Request) -> Response:
        sessions.end(request.cookies.get(cookie_name(request)))
        response = JSONResponse({"logged_out": True})
        response.delete_cookie(cookie_name(request), path="/", httponly=True, samesite="strict")
        return response

    async def login_code(request: Request) -> Response:
        code, ttl = sessions.new_code()
        return JSONResponse({"path": f"{LOGIN_PATH}?code={code}", "expires_in": ttl}, status_code=201)

    async def to_overview(request: Request) -> Response:
        return RedirectResponse("/dashboard/", status_code=307)

    async def events(request: Request) -> Response:
        nonlocal open_streams
        if open_streams >= MAX_STREAMS:
            return JSONResponse({"error": "too many live streams open"}, status_code=429)
        open_streams += 1

        async def stream() -> AsyncIterator[str]:
            nonlocal open_streams
            try:
                last: str | None = None
                quiet_since = trio.current_time()
                with trio.move_on_after(STREAM_MAX_SECONDS):
                    yield "retry: 2000\n\n"
                    while True:
                        snapshot = json.dumps(jsonable(await live_snapshot(operator)), sort_keys=True)
                        now = trio.current_time()
                        if snapshot != last:
                            last, quiet_since = snapshot, now
                            yield f"event: state\ndata: {snapshot}\n\n"
                        elif now - quiet_since >= HEARTBEAT_SECONDS:
                            quiet_since = now
                            yield ": keep-alive\n\n"
                        await trio.sleep(POLL_SECONDS)
            finally:
                open_streams -= 1

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    routes: list[BaseRoute] = [
        Route(LOGIN_PATH, login, methods=["GET"]),
        Route("/dashboard/logout", logout, methods=["POST"]),
        Route("/dashboard/events", events, methods=["GET"]),
        Route("/api/dashboard/login-code", login_code, methods=["POST"]),
        Route("/dashboard", to_overview, methods=["GET"]),
        Mount("/dashboard/static", StaticFiles(directory=HERE / "static"), name="dashboard-static"),
    ]
    for sub, template, title in PAGES:
        routes.append(Route("/dashboard" + sub, page(template, title, loaders[sub]), methods=["GET"]))
    return routes
