"""The peer's local control API: JSON over HTTP on loopback, in front of :class:`Operator`.

The CLI (``control_client.py``) and, later, a dashboard served from the same origin use
it to ask a running peer for its state and to act on it (name and delete models, register
datasets, approve rounds). It listens on loopback only and every request carries the
token stored in ``<data_dir>/control.token`` (mode 0600), so only the user running the
peer (or root) can use it. State-changing requests are also refused when they come from
another web origin (the ``Origin`` header) or carry a content type a cross-site form could
send, so a web page open in the operator's browser cannot drive the peer.

Routes (all answer JSON; errors are ``{"error": message}``)::

    GET    /api/status
    GET    /api/neighbours
    PUT    /api/neighbours/selection      {"peer_ids": [...]}
    GET    /api/rounds
    GET    /api/models
    PATCH  /api/models/{ref}              {"name": "..."}
    DELETE /api/models/{ref}
    GET    /api/models/{ref}/export?format=pt|safetensors   (file download)
    POST   /api/models/import?filename=F  (body: safetensors bytes, octet-stream)
    GET    /api/datasets
    POST   /api/datasets                  {"path": "/abs/folder"}
    GET    /api/approvals
    POST   /api/approvals/{id}            {"approve": true|false}
    POST   /api/study/approve             {"digest": "<64 hex digits>"}
    GET    /api/audit?limit=N             (newest first)
    POST   /api/audit/verify
    POST   /api/dashboard/login-code      (bearer token only: a one-time dashboard login)

The dashboard (``silomesh.peer.dashboard``) is served by the same app under
``/dashboard/``. A browser authenticates with an HttpOnly, SameSite=Strict session cookie
obtained by opening a one-time login URL (``silomesh peer dashboard``); requests carrying
the cookie instead of the bearer token must also send the session's CSRF token in
``X-CSRF-Token`` when they change state.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from silomesh.peer.dashboard.pages import LOGIN_PATH, STATIC_PREFIX, cookie_name, login_needed, make_routes
from silomesh.peer.dashboard.sessions import CSRF_HEADER, Sessions
from silomesh.peer.operator import Operator, OperatorError

if TYPE_CHECKING:  # trio-typing's stubs, when installed, shadow trio's own TaskStatus
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)

#: name of the token file in the peer's data_dir; the server writes it, the CLI reads it
TOKEN_FILE_NAME = "control.token"
#: default limit on an imported model's size
DEFAULT_MAX_IMPORT_BYTES = 2 * 1024**3
#: limit on a JSON request body
MAX_JSON_BYTES = 1024 * 1024
#: export formats the API accepts
EXPORT_FORMATS = ("pt", "safetensors")

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MIN_TOKEN_CHARS = 32

Endpoint = Callable[[Request], Awaitable[Response]]
#: what a response body is made of
JSONValue: TypeAlias = "Mapping[str, JSONValue] | Sequence[JSONValue] | str | int | float | bool | None"
T = TypeVar("T")


class TokenFileError(Exception):
    """The control token file cannot be created or is unsafe to use; the message says why."""


# --------------------------------------------------------------------------- token file


def ensure_token_file(path: Path) -> str:
    """Return the control token stored at ``path``, creating the file (mode 0600) if missing.

    Raises:
        TokenFileError: if the file is readable by group or others, not owned by this user,
            not a regular file, or does not hold a valid token.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        fd = -1
    except OSError as exc:
        raise TokenFileError(
            f"cannot create the control token file {path}: {exc.strerror}"
        ) from None
    if fd < 0:
        return read_token_file(path, check_mode=True)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    logger.info("created control token file %s", path)
    return token


def read_token_file(path: Path, *, check_mode: bool = True) -> str:
    """Read a control token file.

    Args:
        path: the token file.
        check_mode: refuse a file that group or others may read, or that another user owns.

    Raises:
        TokenFileError: if the file is missing, unsafe (with ``check_mode``) or malformed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise TokenFileError(f"no control token file at {path}") from None
    except OSError as exc:
        raise TokenFileError(f"cannot read the control token file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"control token file {path} is not a regular file")
        if check_mode:
            if info.st_mode & 0o077:
                raise TokenFileError(
                    f"control token file {path} is readable by other users "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); run 'chmod 600 {path}' or delete it"
                )
            if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
                raise TokenFileError(f"control token file {path} belongs to another user")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    token = raw.decode("ascii", errors="replace").strip()
    if len(token) < _MIN_TOKEN_CHARS or not all(c.isalnum() or c in "-_" for c in token):
        raise TokenFileError(f"control token file {path} does not hold a valid token; delete it")
    return token


# --------------------------------------------------------------------------- helpers


def _jsonable(value: object) -> JSONValue:
    """Turn an Operator result into plain JSON (non-finite floats become null)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(cast("list[str | float]", [_jsonable(v) for v in value]))  # a set holds hashable scalars
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return _jsonable(item())
    return str(value)


def _json(content: object, status_code: int = 200) -> JSONResponse:
    return JSONResponse(_jsonable(content), status_code=status_code)


def _error(message: str, status_code: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


def _is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """The host part of a Host header (``127.0.0.1:8787``, ``[::1]:8787``, ``localhost``)."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the request body, refusing (413) one larger than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise OperatorError(f"request body too large (limit {limit} bytes)", 413)
        except ValueError:
            raise OperatorError("invalid Content-Length header", 400) from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise OperatorError(f"request body too large (limit {limit} bytes)", 413)
    return bytes(body)


async def _json_body(request: Request) -> dict[str, Any]:
    """Parse a JSON object body; the content type must be application/json (else 415)."""
    if _content_type(request) != "application/json":
        raise OperatorError("expected Content-Type: application/json", 415)
    raw = await _read_body(request, MAX_JSON_BYTES)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise OperatorError("request body is not valid JSON", 400) from None
    if not isinstance(data, dict):
        raise OperatorError("request body must be a JSON object", 400)
    return data


def _field(data: dict[str, Any], key: str, kind: type[T], what: str) -> T:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise OperatorError(f"'{key}' must be {what}", 400)
    return value


def _endpoint(handler: Endpoint) -> Endpoint:
    """Map OperatorError to its status and anything unexpected to a logged, opaque 500."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except OperatorError as exc:
            status = exc.status if 400 <= exc.status <= 599 else 400
            return _error(str(exc), status)
        except Exception:
            logger.exception("control API: %s %s failed", request.method, request.url.path)
            return _error("internal error", 500)

    return wrapper


# --------------------------------------------------------------------------- guard


class _Guard:
    """ASGI middleware: loopback Host, same-origin for state changes, bearer token or session.

    The Host check defeats DNS rebinding (a page on evil.example resolving to 127.0.0.1
    would send ``Host: evil.example``), which the Origin check alone would not. A dashboard
    session cookie stands in for the token, except on ``/api/dashboard/`` (minting login
    codes needs the token); with a cookie, state-changing requests also need the session's
    CSRF token. Only the login exchange and the static assets need neither.
    """

    def __init__(self, app: ASGIApp, token: str, sessions: Sessions) -> None:
        self.app = app
        self._token = token.encode("ascii")
        self._sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        message, status = refusal
        logger.warning("control API refused %s %s: %s", request.method, request.url.path, message)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status == 401 and request.url.path.startswith("/dashboard"):
            await login_needed()(scope, receive, send)
            return
        await _error(message, status, headers)(scope, receive, send)

    def _refusal(self, request: Request) -> tuple[str, int] | None:
        host = request.headers.get("host", "")
        if not _is_loopback_host(_host_name(host)):
            return "the control API only answers requests addressed to loopback", 403
        origin = request.headers.get("origin")
        if request.method not in _SAFE_METHODS and origin is not None:
            own = f"{request.url.scheme}://{host}".lower()
            if origin.rstrip("/").lower() != own:
                return "cross-origin request refused", 403
        path = request.url.path
        if request.method in _SAFE_METHODS and (path == LOGIN_PATH or path.startswith(STATIC_PREFIX)):
            return None  # the login exchange and public assets (script, style, chart library)
        auth = request.headers.get("authorization", "")
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode("latin-1", "replace"), self._token
        ):
            return None
        session = self._sessions.get(request.cookies.get(cookie_name(request)))
        if session is not None and not path.startswith("/api/dashboard/"):
            if request.method in _SAFE_METHODS:
                return None
            presented_csrf = request.headers.get(CSRF_HEADER, "")
            if hmac.compare_digest(presented_csrf.encode("latin-1", "replace"), session.csrf.encode("ascii")):
                return None
            return "missing or wrong CSRF token", 403
        return "missing or wrong control token", 401


# --------------------------------------------------------------------------- app


def make_app(
    operator: Operator, token: str, *, max_import_bytes: int = DEFAULT_MAX_IMPORT_BYTES
) -> Starlette:
    """Build the control API for ``operator``; requests must carry ``Bearer <token>``.

    Args:
        operator: the running peer.
        token: the shared secret from the token file.
        max_import_bytes: largest model file ``POST /api/models/import`` accepts.
    """
    if len(token) < 16:
        raise ValueError("control token too short")
    sessions = Sessions()

    @_endpoint
    async def status(request: Request) -> Response:
        return _json(await operator.status())

    @_endpoint
    async def neighbours(request: Request) -> Response:
        return _json(await operator.neighbours())

    @_endpoint
    async def select_neighbours(request: Request) -> Response:
        data = await _json_body(request)
        peer_ids = _field(data, "peer_ids", list, "a list of PeerIDs")
        if not all(isinstance(p, str) for p in peer_ids):
            raise OperatorError("'peer_ids' must be a list of PeerIDs", 400)
        return _json(await operator.select_neighbours(peer_ids))

    @_endpoint
    async def rounds(request: Request) -> Response:
        return _json(await operator.rounds())

    @_endpoint
    async def models(request: Request) -> Response:
        return _json(await operator.models())

    @_endpoint
    async def rename_model(request: Request) -> Response:
        data = await _json_body(request)
        name = _field(data, "name", str, "a string")
        return _json(await operator.rename_model(request.path_params["ref"], name))

    @_endpoint
    async def delete_model(request: Request) -> Response:
        return _json(await operator.delete_model(request.path_params["ref"]))

    @_endpoint
    async def export_model(request: Request) -> Response:
        ref = request.path_params["ref"]
        fmt = request.query_params.get("format", "")
        if fmt not in EXPORT_FORMATS:
            raise OperatorError(f"format must be one of {', '.join(EXPORT_FORMATS)}", 400)
        path = Path(await operator.export_model(ref, fmt))
        try:
            info = await trio.Path(path).stat()
        except OSError:
            logger.error("export of %s: the peer returned %s, which cannot be read", ref, path)
            raise
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=path.name,
            stat_result=info,
        )

    @_endpoint
    async def import_model(request: Request) -> Response:
        if _content_type(request) != "application/octet-stream":
            raise OperatorError("expected Content-Type: application/octet-stream", 415)
        filename = request.query_params.get("filename") or request.headers.get("x-filename", "")
        filename = Path(filename).name  # a name for the record, never a path to write to
        if not filename:
            raise OperatorError("give the file name (query parameter 'filename')", 400)
        data = await _read_body(request, max_import_bytes)
        if not data:
            raise OperatorError("empty model file", 400)
        return _json(await operator.import_model(data, filename), 201)

    @_endpoint
    async def datasets(request: Request) -> Response:
        return _json(await operator.datasets())

    @_endpoint
    async def register_dataset(request: Request) -> Response:
        data = await _json_body(request)
        path = _field(data, "path", str, "a folder path")
        return _json(await operator.register_dataset(path), 201)

    @_endpoint
    async def approvals(request: Request) -> Response:
        return _json(await operator.approvals())

    @_endpoint
    async def decide(request: Request) -> Response:
        data = await _json_body(request)
        approve = _field(data, "approve", bool, "true or false")
        return _json(await operator.decide(request.path_params["approval_id"], approve))

    @_endpoint
    async def approve_study(request: Request) -> Response:
        data = await _json_body(request)
        digest = _field(data, "digest", str, "the study's digest (64 hex digits)")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise OperatorError("'digest' must be the study's digest (64 lowercase hex digits)", 400)
        return _json(await operator.approve_study(digest))

    @_endpoint
    async def audit(request: Request) -> Response:
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
            raise OperatorError("limit must be a number from 1 to 10000", 400)
        return _json(await operator.audit(int(raw)))

    @_endpoint
    async def verify_audit(request: Request) -> Response:
        return _json(await operator.verify_audit())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(str(exc.detail), exc.status_code, dict(exc.headers or {}))

    routes = [
        Route("/api/status", status, methods=["GET"]),
        Route("/api/neighbours", neighbours, methods=["GET"]),
        Route("/api/neighbours/selection", select_neighbours, methods=["PUT"]),
        Route("/api/rounds", rounds, methods=["GET"]),
        Route("/api/models", models, methods=["GET"]),
        Route("/api/models/import", import_model, methods=["POST"]),
        Route("/api/models/{ref}", rename_model, methods=["PATCH"]),
        Route("/api/models/{ref}", delete_model, methods=["DELETE"]),
        Route("/api/models/{ref}/export", export_model, methods=["GET"]),
        Route("/api/datasets", datasets, methods=["GET"]),
        Route("/api/datasets", register_dataset, methods=["POST"]),
        Route("/api/approvals", approvals, methods=["GET"]),
        Route("/api/approvals/{approval_id:int}", decide, methods=["POST"]),
        Route("/api/study/approve", approve_study, methods=["POST"]),
        Route("/api/audit", audit, methods=["GET"]),
        Route("/api/audit/verify", verify_audit, methods=["POST"]),
        *make_routes(operator, sessions, _jsonable),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.add_middleware(_Guard, token=token, sessions=sessions)
    return app


# --------------------------------------------------------------------------- server


def _bind_address(host: str, port: int) -> str:
    if not _is_loopback_host(host):
        raise ValueError(f"the control API only listens on loopback, got host {host!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port")
    if host.lower() == "localhost":
        host = "127.0.0.1"
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_control(
    operator: Operator,
    host: str,
    port: int,
    token_file: Path,
    *,
    max_import_bytes: int = DEFAULT_MAX_IMPORT_BYTES,
    task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API on ``host:port`` (loopback only) until cancelled.

    Creates ``token_file`` (mode 0600) on first use and reuses it afterwards. Reports the
    bound port (useful with ``port=0``) through ``task_status.started``.

    Raises:
        ValueError: if ``host`` is not a loopback address or ``port`` is invalid.
        TokenFileError: if the token file is unsafe or malformed.
        OSError: if the address cannot be bound.
    """
    bind = _bind_address(host, port)
    token = ensure_token_file(token_file)
    app = make_app(operator, token, max_import_bytes=max_import_bytes)
    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger(f"{__name__}.http")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 5.0
    listening = False
    try:
        async with trio.open_nursery() as nursery:
            bound: list[str] = await nursery.start(serve, app, config)
            listening = True
            actual = int(bound[0].rsplit(":", 1)[1])
            logger.info("control API listening on %s (token in %s)", bound[0], token_file)
            task_status.started(actual)
    except BaseExceptionGroup as group:
        leaf = _single_leaf(group)
        if not listening and isinstance(leaf, OSError):
            # hypercorn nests the bind error in several nurseries; give the caller the error
            message = f"control API cannot listen on {bind}: {leaf.strerror}"
            raise OSError(leaf.errno, message) from None
        raise


def _single_leaf(exc: BaseException) -> BaseException:
    """The only exception inside nested one-member groups (or the group itself)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
