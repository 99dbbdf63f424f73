"""Dashboard logins: one-time codes exchanged for HttpOnly, SameSite=Strict session cookies.

A browser cannot send the control token as a bearer header when it navigates, so
``silomesh peer dashboard`` asks the peer (with the token) for a short-lived one-time
login code and prints a URL carrying it. Opening the URL swaps the code for a session
cookie and redirects to a URL without it, so neither the token nor a usable code stays in
the browser's history. Each session has its own CSRF token that state-changing requests
must echo in the ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

#: name of the session cookie
COOKIE_NAME = "silomesh_session"
#: header carrying the session's CSRF token on state-changing requests
CSRF_HEADER = "x-csrf-token"
#: seconds a login code stays valid
CODE_TTL_SECONDS = 120.0
#: seconds a session stays valid
SESSION_TTL_SECONDS = 12 * 3600.0
#: most login codes / sessions kept (oldest dropped first)
MAX_CODES = 16
MAX_SESSIONS = 32


@dataclass(frozen=True)
class Session:
    """One logged-in browser."""

    session_id: str
    csrf: str
    expires_at: float


class Sessions:
    """In-memory login codes and sessions (a peer restart logs everyone out)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._codes: dict[str, float] = {}
        self._sessions: dict[str, Session] = {}

    def _expire(self) -> None:
        now = self._clock()
        self._codes = {c: t for c, t in self._codes.items() if t > now}
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires_at > now}

    def new_code(self) -> tuple[str, float]:
        """A fresh one-time login code and its lifetime in seconds."""
        self._expire()
        while len(self._codes) >= MAX_CODES:
            self._codes.pop(next(iter(self._codes)))
        code = secrets.token_urlsafe(24)
        self._codes[code] = self._clock() + CODE_TTL_SECONDS
        return code, CODE_TTL_SECONDS

    def redeem(self, code: str) -> Session | None:
        """Swap a valid, unused code for a new session; None if the code is unknown or spent."""
        self._expire()
        match = next((c for c in self._codes if hmac.compare_digest(c.encode(), code.encode())), None)
        if match is None:
            return None
        del self._codes[match]
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(24), self._clock() + SESSION_TTL_SECONDS)
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, if any."""
        if not session_id:
            return None
        self._expire()
        return self._sessions.get(session_id)

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)
