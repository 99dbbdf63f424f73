"""Helpers for the dashboard's browser tests and screenshots (not a test module).

Real peers run on their own trio loop in a background thread; selenium drives Debian's
headless Chromium through chromedriver from the calling thread.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import trio
from peerkit import configs

from silomesh.peer.control import TOKEN_FILE_NAME, read_token_file
from silomesh.peer.daemon import Peer

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

T = TypeVar("T")

CHROMIUM = os.environ.get("SILOMESH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SILOMESH_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-extensions",
    "--no-first-run",
)


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)) and shutil.which(path) is None:
            return f"{path} not found: install Debian's chromium and chromium-driver (make browser-deps)"
    return None


def make_driver(width: int = 1280, height: int = 900) -> WebDriver:
    """A headless Chromium session (selenium WebDriver); the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    return driver


class PeerThread:
    """Run peers on a trio loop in a daemon thread; call into it with :meth:`call`."""

    def __init__(self, peers: list[Peer]) -> None:
        self.peers = peers
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="peers", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            for p in self.peers:
                await nursery.start(p.run)
            self._ready.set()
            await trio.sleep_forever()

    def start(self, timeout: float = 60.0) -> PeerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("peers did not start in time")
        if self.error is not None:
            raise RuntimeError("peers failed to start") from self.error
        return self

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the peers' loop and return its result."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def stop(self, timeout: float = 30.0) -> None:
        if self._scope is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("peers did not stop in time")


def start_pair(root: Path, *, participation: str = "manual", rounds: int = 3, deadline: float = 15.0) -> PeerThread:
    """Two peers: ``peers[0]`` (policy ``participation``) serves its control API, ``peers[1]`` runs auto."""
    ids, cfgs = configs(root, 2, rounds=rounds, deadline=deadline)
    cfgs[0] = dataclasses.replace(cfgs[0], participation=participation)
    peers = [
        Peer(cfgs[0], identity=ids[0], serve_control_api=True),
        Peer(cfgs[1], identity=ids[1], serve_control_api=False),
    ]
    return PeerThread(peers).start()


def base_url(peer: Peer) -> str:
    assert peer.control_port, "the control API did not start"
    return f"http://127.0.0.1:{peer.control_port}"


def login_url(peer: Peer) -> str:
    """A one-time dashboard login URL, obtained the way ``silomesh peer dashboard`` does."""
    token = read_token_file(peer.config.data_dir / TOKEN_FILE_NAME)
    reply = httpx.post(
        f"{base_url(peer)}/api/dashboard/login-code",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
        trust_env=False,
    )
    reply.raise_for_status()
    return base_url(peer) + reply.json()["path"]
