"""A small synchronous client of the peer's control API, used by the CLI.

It finds the API and its token from the peer's ``peer.toml`` (``[control]`` host and
port, ``<data_dir>/control.token``) and turns every failure into a :class:`ControlError`
whose message is one line fit to show the operator.

Example::

    with ControlClient.from_config(Path("peer.toml")) as client:
        for model in client.models():
            print(model["digest"], model.get("name"))
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from silomesh.peer.config import ConfigError, load_config
from silomesh.peer.control import TOKEN_FILE_NAME, TokenFileError, read_token_file

logger = logging.getLogger(__name__)

#: seconds to wait for the connection and for quick requests
DEFAULT_TIMEOUT = 30.0
#: seconds to wait for a model export or import (large files, validation on the peer)
TRANSFER_TIMEOUT = 600.0
#: the largest JSON reply read (the longest lists, rounds and audit entries, are far smaller)
MAX_REPLY_BYTES = 64 * 1024 * 1024
#: the largest error reply read when an export fails
MAX_ERROR_BYTES = 64 * 1024


class ControlError(Exception):
    """A control API request failed; the message is one line for the operator."""


def _display_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ControlClient:
    """Talks to one peer's control API.

    Args:
        host: the API's loopback host.
        port: the API's port.
        token: the bearer token from the peer's token file.
        timeout: seconds for connecting and for quick requests.
        transport: an httpx transport (tests pass one to talk to an app in memory).
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.address = _display_address(host, port)
        self._http = httpx.Client(
            base_url=f"http://{self.address}",
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
            trust_env=False,  # never send the token through a proxy
        )

    @classmethod
    def from_config(cls, config_path: Path, **kwargs: Any) -> ControlClient:
        """Build a client for the peer configured by ``config_path``.

        Raises:
            ControlError: if the config or the token file cannot be read.
        """
        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            raise ControlError(str(exc)) from None
        token_path = cfg.data_dir / TOKEN_FILE_NAME
        try:
            token = read_token_file(token_path, check_mode=False)
        except TokenFileError as exc:
            hint = (
                " — is 'silomesh peer run' running with this config?"
                if not token_path.exists()
                else " — run this as the user that runs the peer"
            )
            raise ControlError(f"{exc}{hint}") from None
        return cls(cfg.control.host, cfg.control.port, token, **kwargs)

    # ----------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unreachable(self) -> ControlError:
        return ControlError(
            f"cannot reach the peer's control API at {self.address} — "
            "is 'silomesh peer run' running?"
        )

    def _read(self, response: httpx.Response, limit: int) -> bytes:
        """The reply's body, refused beyond ``limit`` bytes (read inside :meth:`_errors`)."""
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise ControlError(f"control API at {self.address} sent a reply of more than {limit:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check(self, response: httpx.Response, body: bytes) -> None:
        if response.is_success:
            return
        if response.status_code == 401:
            raise ControlError(
                f"control API at {self.address} refused the token — is this the config "
                "of the peer running there?"
            )
        message = ""
        with contextlib.suppress(ValueError):
            reply = json.loads(body)
            if isinstance(reply, dict) and isinstance(reply.get("error"), str):
                message = reply["error"]
        if not message:
            message = f"control API answered HTTP {response.status_code}"
        raise ControlError(" ".join(message.split()))  # one line

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError:
            raise self._unreachable() from None
        except httpx.TimeoutException:
            raise ControlError(
                f"the peer's control API at {self.address} did not answer in time"
            ) from None
        except httpx.HTTPError as exc:
            raise ControlError(f"control API at {self.address}: {exc}") from None

    def _request(self, method: str, url: str, **kwargs: Any) -> Any:  # noqa: ANN401 - response.json(), shaped by each caller
        with self._errors(), self._http.stream(method, url, **kwargs) as response:
            body = self._read(response, MAX_REPLY_BYTES)
        self._check(response, body)
        try:
            return json.loads(body)
        except ValueError:
            raise ControlError(
                f"control API at {self.address} sent a reply that is not JSON"
            ) from None

    # ----------------------------------------------------------------- operations

    def status(self) -> dict[str, Any]:
        """The peer's status (PeerID, federation, round, phase, health...)."""
        return dict(self._request("GET", "/api/status"))

    def neighbours(self) -> list[dict[str, Any]]:
        """The trusted peers and their state."""
        return list(self._request("GET", "/api/neighbours"))

    def select_neighbours(self, peer_ids: list[str]) -> list[dict[str, Any]]:
        """Choose the neighbours of the next round; returns :meth:`neighbours`."""
        return list(self._request("PUT", "/api/neighbours/selection", json={"peer_ids": peer_ids}))

    def rounds(self) -> list[dict[str, Any]]:
        """The rounds so far."""
        return list(self._request("GET", "/api/rounds"))

    def models(self) -> list[dict[str, Any]]:
        """The model versions."""
        return list(self._request("GET", "/api/models"))

    def rename_model(self, ref: str, name: str) -> dict[str, Any]:
        """Name a model version."""
        return dict(self._request("PATCH", f"/api/models/{_ref(ref)}", json={"name": name}))

    def delete_model(self, ref: str) -> dict[str, Any]:
        """Delete a model version's weights."""
        return dict(self._request("DELETE", f"/api/models/{_ref(ref)}"))

    def export_model(self, ref: str, fmt: str, out: Path, *, overwrite: bool = False) -> int:
        """Download a model version as ``fmt`` into ``out``, atomically; returns its size.

        Raises:
            ControlError: on any failure; ``out`` is then left as it was.
        """
        if out.exists() and not overwrite:
            raise ControlError(f"{out} exists; choose another file or pass --force")
        if out.is_dir():
            raise ControlError(f"{out} is a folder; give a file name")
        parent = out.parent
        if not parent.is_dir():
            raise ControlError(f"folder {parent} does not exist")
        url = f"/api/models/{_ref(ref)}/export"
        tmp: str | None = None
        try:
            with self._errors(), self._http.stream(
                "GET", url, params={"format": fmt}, timeout=TRANSFER_TIMEOUT
            ) as response:
                if not response.is_success:
                    self._check(response, self._read(response, MAX_ERROR_BYTES))
                fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=parent)
                size = 0
                with os.fdopen(fd, "wb") as f:
                    for chunk in response.iter_bytes(1024 * 1024):
                        f.write(chunk)
                        size += len(chunk)
                    f.flush()
                    os.fsync(f.fileno())
            expected = response.headers.get("content-length")
            if expected is not None and int(expected) != size:
                raise ControlError(f"export of {ref} was cut short ({size} of {expected} bytes)")
            os.replace(tmp, out)
            tmp = None
        except OSError as exc:
            raise ControlError(f"cannot write {out}: {exc.strerror or exc}") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return size

    def import_model(self, path: Path) -> dict[str, Any]:
        """Send a safetensors file to the peer as its initial model."""
        try:
            f = path.open("rb")
        except OSError as exc:
            raise ControlError(f"cannot read {path}: {exc.strerror or exc}") from None
        with f:
            return dict(
                self._request(
                    "POST",
                    "/api/models/import",
                    params={"filename": path.name},
                    content=f,
                    headers={"Content-Type": "application/octet-stream"},
                    timeout=TRANSFER_TIMEOUT,
                )
            )

    def datasets(self) -> list[dict[str, Any]]:
        """The registered datasets."""
        return list(self._request("GET", "/api/datasets"))

    def register_dataset(self, path: Path) -> dict[str, Any]:
        """Register a dataset folder (sent as an absolute path: the peer has its own cwd)."""
        return dict(self._request("POST", "/api/datasets", json={"path": str(path.resolve())}))

    def approvals(self) -> list[dict[str, Any]]:
        """Pending and decided approval requests."""
        return list(self._request("GET", "/api/approvals"))

    def decide(self, approval_id: int, approve: bool) -> dict[str, Any]:
        """Approve or decline a pending request."""
        return dict(
            self._request("POST", f"/api/approvals/{int(approval_id)}", json={"approve": approve})
        )

    def approve_study(self, digest: str) -> dict[str, Any]:
        """Approve the peer's study by its digest (hex); the study as the peer now reports it."""
        return dict(self._request("POST", "/api/study/approve", json={"digest": digest}))

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent audit-log entries, newest first."""
        return list(self._request("GET", "/api/audit", params={"limit": int(limit)}))

    def verify_audit(self) -> dict[str, Any]:
        """The peer's verification of its own audit log."""
        return dict(self._request("POST", "/api/audit/verify"))

    def dashboard_login_url(self) -> str:
        """A one-time URL that logs a browser into the peer's dashboard (valid two minutes)."""
        reply = self._request("POST", "/api/dashboard/login-code")
        return f"http://{self.address}{reply['path']}"


def _ref(ref: str) -> str:
    """A model reference as one URL path segment."""
    if not ref or "/" in ref:
        raise ControlError(f"invalid model reference {ref!r}")
    return quote(ref, safe="")
