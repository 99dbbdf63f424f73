"""The local control API: endpoints, token, cross-site refusals, errors, real server + CLI."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import trio
from click.testing import CliRunner, Result

from silomesh.peer import control_client
from silomesh.peer.cli_ops import (
    approvals,
    data,
    models,
    neighbours,
    peer_dashboard,
    peer_rounds,
    peer_status,
    register,
)
from silomesh.peer.control import (
    TOKEN_FILE_NAME,
    TokenFileError,
    ensure_token_file,
    make_app,
    serve_control,
)
from silomesh.peer.control_client import ControlClient, ControlError
from silomesh.peer.operator import OperatorError

TOKEN = "t" * 43
BASE = "http://127.0.0.1:8787"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIGEST_A = "aa" * 32
DIGEST_B = "bb" * 32
PEER_X = "12D3KooWXxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"


class FakeOperator:
    """An in-memory peer implementing the Operator protocol; records every call."""

    def __init__(self, export_dir: Path) -> None:
        self.export_dir = export_dir
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[str, BaseException] = {}
        self.models_: list[dict[str, Any]] = [
            {
                "digest": DIGEST_A,
                "round": 0,
                "name": "baseline",
                "parent": None,
                "created_at": 1_700_000_000.0,
                "origin": "import",
            },
            {
                "digest": DIGEST_B,
                "round": 1,
                "name": None,
                "parent": DIGEST_A,
                "created_at": 1_700_000_100.0,
                "origin": "round",
            },
        ]
        self.neighbours_: list[dict[str, Any]] = [
            {
                "peer_id": PEER_X,
                "name": "st-x",
                "connected": True,
                "selected": True,
                "samples": 120,
                "last_seen": 1_700_000_050.0,
                "refused": 0,
                "connection": "relayed",
                "rtt_ms": 12.34,
                "reconnects": 2,
                "dial_failures": 3,
            },
        ]
        self.datasets_: list[dict[str, Any]] = []
        self.approvals_: list[dict[str, Any]] = [
            {"id": 7, "kind": "round", "status": "pending", "round": 2, "peer": None},
        ]
        self.imported: list[tuple[bytes, str]] = []

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    def _model(self, ref: str) -> dict[str, Any]:
        for m in self.models_:
            if m["digest"].startswith(ref) or m["name"] == ref:
                return m
        raise OperatorError(f"no model {ref!r}", 404)

    async def status(self) -> dict[str, Any]:
        self._call("status")
        return {
            "peer_id": "12D3KooWSelf",
            "federation": "fed",
            "round": 2,
            "phase": "idle",
            "healthy": True,
            "loss": float("nan"),
        }

    async def neighbours(self) -> list[dict[str, Any]]:
        self._call("neighbours")
        return self.neighbours_

    async def select_neighbours(self, peer_ids: list[str]) -> list[dict[str, Any]]:
        self._call("select_neighbours", peer_ids)
        for n in self.neighbours_:
            n["selected"] = n["peer_id"] in peer_ids
        return self.neighbours_

    async def rounds(self) -> list[dict[str, Any]]:
        self._call("rounds")
        return [{"round": 1, "status": "done", "contributors": [PEER_X], "bytes_sent": 10}]

    async def models(self) -> list[dict[str, Any]]:
        self._call("models")
        return self.models_

    async def rename_model(self, ref: str, name: str) -> dict[str, Any]:
        self._call("rename_model", ref, name)
        model = self._model(ref)
        model["name"] = name
        return model

    async def delete_model(self, ref: str) -> dict[str, Any]:
        self._call("delete_model", ref)
        model = self._model(ref)
        model["deleted"] = True
        return model

    async def export_model(self, ref: str, fmt: str) -> Path:
        self._call("export_model", ref, fmt)
        model = self._model(ref)
        path = self.export_dir / f"{model['digest'][:12]}.{fmt}"
        path.write_bytes(f"{fmt}:{model['digest']}".encode() * 1000)
        return path

    async def import_model(self, data: bytes, filename: str) -> dict[str, Any]:
        self._call("import_model", len(data), filename)
        self.imported.append((data, filename))
        return {"digest": "cc" * 32, "round": 0, "name": filename, "origin": "import"}

    async def datasets(self) -> list[dict[str, Any]]:
        self._call("datasets")
        return self.datasets_

    async def register_dataset(self, path: str) -> dict[str, Any]:
        self._call("register_dataset", path)
        record = {"id": len(self.datasets_) + 1, "path": path, "count": 12}
        self.datasets_.append(record)
        return record

    async def approvals(self) -> list[dict[str, Any]]:
        self._call("approvals")
        return self.approvals_

    async def decide(self, approval_id: int, approve: bool) -> dict[str, Any]:
        self._call("decide", approval_id, approve)
        for a in self.approvals_:
            if a["id"] == approval_id:
                a["status"] = "approved" if approve else "declined"
                return a
        raise OperatorError(f"no pending request {approval_id}", 404)

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        self._call("audit", limit)
        return [{"seq": 2, "direction": "sent", "kind": "delta"}, {"seq": 1, "direction": "received", "kind": "delta"}][
            :limit
        ]

    async def verify_audit(self) -> dict[str, Any]:
        self._call("verify_audit")
        return {"ok": True, "summary": "OK: 2 entries, chain intact", "findings": []}


@pytest.fixture
def operator(tmp_path: Path) -> FakeOperator:
    return FakeOperator(tmp_path)


def _asgi_client(
    operator: FakeOperator, base_url: str = BASE, headers: dict[str, str] | None = None
) -> httpx.AsyncClient:
    app = make_app(operator, TOKEN, max_import_bytes=1024)
    headers = AUTH if headers is None else headers
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=base_url, headers=headers)


@pytest.fixture
async def client(operator: FakeOperator) -> AsyncIterator[httpx.AsyncClient]:
    async with _asgi_client(operator) as c:
        yield c


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("url", "method"),
    [
        ("/api/neighbours", "neighbours"),
        ("/api/rounds", "rounds"),
        ("/api/models", "models"),
        ("/api/datasets", "datasets"),
        ("/api/approvals", "approvals"),
    ],
)
async def test_list_endpoints_return_the_operators_rows(
    client: httpx.AsyncClient, operator: FakeOperator, url: str, method: str
) -> None:
    response = await client.get(url)
    assert response.status_code == 200
    assert isinstance(response.json(), list)
    assert operator.calls == [(method, ())]


async def test_status_returns_json_with_non_finite_floats_as_null(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/status")
    assert response.status_code == 200
    assert response.json()["peer_id"] == "12D3KooWSelf"
    assert response.json()["loss"] is None


async def test_put_selection_passes_peer_ids(
    client: httpx.AsyncClient, operator: FakeOperator
) -> None:
    response = await client.put("/api/neighbours/selection", json={"peer_ids": []})
    assert response.status_code == 200
    assert response.json()[0]["selected"] is False
    assert operator.calls == [("select_neighbours", ([],))]


async def test_patch_model_renames_it(client: httpx.AsyncClient, operator: FakeOperator) -> None:
    response = await client.patch(f"/api/models/{DIGEST_B[:8]}", json={"name": "round-one"})
    assert response.status_code == 200
    assert response.json()["name"] == "round-one"
    assert operator.calls == [("rename_model", (DIGEST_B[:8], "round-one"))]


async def test_delete_model_deletes_it(client: httpx.AsyncClient, operator: FakeOperator) -> None:
    response = await client.delete("/api/models/baseline")
    assert response.status_code == 200
    assert response.json()["deleted"] is True


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
async def test_export_downloads_the_file_the_peer_wrote(
    client: httpx.AsyncClient, fmt: str
) -> None:
    response = await client.get(f"/api/models/{DIGEST_A[:6]}/export", params={"format": fmt})
    assert response.status_code == 200
    assert response.content == f"{fmt}:{DIGEST_A}".encode() * 1000
    assert "attachment" in response.headers["content-disposition"]


async def test_export_with_unknown_format_is_refused(
    client: httpx.AsyncClient, operator: FakeOperator
) -> None:
    response = await client.get(f"/api/models/{DIGEST_A}/export", params={"format": "pickle"})
    assert response.status_code == 400
    assert "format" in response.json()["error"]
    assert operator.calls == []


async def test_import_passes_raw_bytes_and_base_filename(
    client: httpx.AsyncClient, operator: FakeOperator
) -> None:
    response = await client.post(
        "/api/models/import",
        params={"filename": "../../init.safetensors"},
        content=b"\x08\x00safetensors",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201
    assert operator.imported == [(b"\x08\x00safetensors", "init.safetensors")]


async def test_import_larger_than_the_limit_is_refused_with_413(
    client: httpx.AsyncClient, operator: FakeOperator
) -> None:
    response = await client.post(
        "/api/models/import?filename=big.safetensors",
        content=b"x" * 2048,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 413
    assert operator.imported == []


async def test_post_dataset_registers_the_path(
    client: httpx.AsyncClient, operator: FakeOperator
) -> None:
    response = await client.post("/api/datasets", json={"path": "/srv/xray"})
    assert response.status_code == 201
    assert operator.datasets_ == [{"id": 1, "path": "/srv/xray", "count": 12}]


@pytest.mark.parametrize("approve", [True, False])
async def test_post_approval_decides_it(
    client: httpx.AsyncClient, operator: FakeOperator, approve: bool
) -> None:
    response = await client.post("/api/approvals/7", json={"approve": approve})
    assert response.status_code == 200
    assert response.json()["status"] == ("approved" if approve else "declined")


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/api/approvals/7", {"approve": "yes"}),
        ("/api/datasets", {"path": 3}),
        ("/api/datasets", ["/srv"]),
        ("/api/neighbours/selection", {"peer_ids": [1]}),
    ],
)
async def test_json_body_of_the_wrong_shape_is_refused_with_400(
    client: httpx.AsyncClient, operator: FakeOperator, url: str, body: object
) -> None:
    method = "PUT" if url.endswith("selection") else "POST"
    response = await client.request(method, url, json=body)
    assert response.status_code == 400
    assert operator.calls == []


async def test_malformed_json_is_refused_with_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/datasets", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"error": "request body is not valid JSON"}


async def test_unknown_route_answers_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/nothing")
    assert response.status_code == 404
    assert "error" in response.json()


# --------------------------------------------------------------------------- guard


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_request_without_the_right_token_is_refused_with_401(
    operator: FakeOperator, headers: dict[str, str]
) -> None:
    async with _asgi_client(operator, headers=headers) as client:
        responses = [await client.get("/api/models"), await client.delete("/api/models/baseline")]
    for response in responses:
        assert response.status_code == 401
        assert response.json() == {"error": "missing or wrong control token"}
    assert operator.calls == []


async def test_cross_origin_post_is_refused_with_403(
    client: httpx.AsyncClient, operator: FakeOperator
) -> None:
    response = await client.post(
        "/api/approvals/7", json={"approve": True}, headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403
    assert operator.calls == []


async def test_same_origin_post_is_accepted(
    client: httpx.AsyncClient, operator: FakeOperator
) -> None:
    response = await client.post(
        "/api/approvals/7", json={"approve": True}, headers={"Origin": BASE}
    )
    assert response.status_code == 200
    assert operator.calls == [("decide", (7, True))]


async def test_request_addressed_to_a_non_loopback_host_is_refused(operator: FakeOperator) -> None:
    """A DNS-rebinding page sends its own name as Host (and as Origin)."""
    async with _asgi_client(operator, base_url="http://evil.example:8787") as client:
        response = await client.post(
            "/api/approvals/7",
            json={"approve": True},
            headers={"Origin": "http://evil.example:8787"},
        )
    assert response.status_code == 403
    assert operator.calls == []


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_non_json_content_type_on_a_json_endpoint_is_refused_with_415(
    client: httpx.AsyncClient, operator: FakeOperator, content_type: str
) -> None:
    response = await client.post(
        "/api/approvals/7", content=b'{"approve": true}', headers={"Content-Type": content_type}
    )
    assert response.status_code == 415
    assert operator.calls == []


async def test_import_with_a_form_content_type_is_refused_with_415(
    client: httpx.AsyncClient, operator: FakeOperator
) -> None:
    response = await client.post(
        "/api/models/import?filename=a.safetensors",
        content=b"abc",
        headers={"Content-Type": "text/plain"},
    )
    assert response.status_code == 415
    assert operator.imported == []


# --------------------------------------------------------------------------- errors


async def test_operator_error_maps_to_its_status_and_message(client: httpx.AsyncClient) -> None:
    response = await client.patch("/api/models/ffff", json={"name": "x"})
    assert response.status_code == 404
    assert response.json() == {"error": "no model 'ffff'"}


async def test_unexpected_exception_is_500_without_details_and_logged(
    client: httpx.AsyncClient, operator: FakeOperator, caplog: pytest.LogCaptureFixture
) -> None:
    operator.fail["models"] = RuntimeError("secret detail /var/lib/peer")
    with caplog.at_level(logging.ERROR, logger="silomesh.peer.control"):
        response = await client.get("/api/models")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error"}
    assert "secret" not in response.text and "Traceback" not in response.text
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


# --------------------------------------------------------------------------- token file


def test_token_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / TOKEN_FILE_NAME
    token = ensure_token_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(token) >= 32
    assert ensure_token_file(path) == token


def test_group_readable_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / TOKEN_FILE_NAME
    ensure_token_file(path)
    os.chmod(path, 0o640)
    with pytest.raises(TokenFileError, match="readable by other users"):
        ensure_token_file(path)


async def test_serve_control_refuses_a_group_readable_token_file(
    tmp_path: Path, operator: FakeOperator
) -> None:
    path = tmp_path / TOKEN_FILE_NAME
    path.write_text("x" * 43)
    os.chmod(path, 0o644)
    with trio.fail_after(5), pytest.raises(TokenFileError, match="readable by other users"):
        await serve_control(operator, "127.0.0.1", 0, path)
    assert operator.calls == []


async def test_serve_control_refuses_a_non_loopback_host(
    tmp_path: Path, operator: FakeOperator
) -> None:
    with pytest.raises(ValueError, match="loopback"):
        await serve_control(operator, "0.0.0.0", 0, tmp_path / TOKEN_FILE_NAME)
    assert not (tmp_path / TOKEN_FILE_NAME).exists()


async def test_serve_control_reports_a_port_in_use_as_a_plain_os_error(
    tmp_path: Path, operator: FakeOperator
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(5), pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1"):
            await serve_control(operator, "127.0.0.1", port, tmp_path / TOKEN_FILE_NAME)
    # hypercorn's Config.create_sockets does not close a socket whose bind failed; reclaim it
    # here so its ResourceWarning does not surface in a later test
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


# --------------------------------------------------------------------------- client and CLI


def _client_with(handler: Callable[[httpx.Request], httpx.Response]) -> ControlClient:
    return ControlClient("127.0.0.1", 8787, TOKEN, transport=httpx.MockTransport(handler))


def test_client_turns_the_servers_error_into_a_control_error() -> None:
    client = _client_with(lambda r: httpx.Response(409, json={"error": "name already used"}))
    with pytest.raises(ControlError, match=r"^name already used$"):
        client.rename_model("aa", "baseline")


def test_client_reports_a_refused_token() -> None:
    client = _client_with(lambda r: httpx.Response(401, json={"error": "x"}))
    with pytest.raises(ControlError, match="refused the token"):
        client.models()


def test_client_refuses_replies_larger_than_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_client, "MAX_REPLY_BYTES", 1000)
    fits = json.dumps([{"digest": "a" * 900}]).encode()
    assert len(fits) <= 1000
    assert _client_with(lambda r: httpx.Response(200, content=fits)).models() == [{"digest": "a" * 900}]
    huge = _client_with(lambda r: httpx.Response(200, content=b"[" + b"1," * 600 + b"1]"))
    with pytest.raises(ControlError, match="sent a reply of more than 1,000 bytes"):
        huge.models()
    # a failed export reads at most MAX_ERROR_BYTES of the error, and leaves no file
    failing = _client_with(lambda r: httpx.Response(500, content=b" " * (control_client.MAX_ERROR_BYTES + 1)))
    with pytest.raises(ControlError, match="more than"):
        failing.export_model("aa", "pt", tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []
    short = _client_with(lambda r: httpx.Response(404, json={"error": "no model aa"}))
    with pytest.raises(ControlError, match=r"^no model aa$"):
        short.export_model("aa", "pt", tmp_path / "model.pt")


def test_client_sends_dataset_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(201, json={"id": 1})

    monkeypatch.chdir(tmp_path)
    _client_with(handler).register_dataset(Path("xray"))
    assert sent == [{"path": str(tmp_path / "xray")}]


def _write_config(folder: Path, port: int) -> Path:
    config = folder / "peer.toml"
    config.write_text(
        f'federation = "fed"\nkey_file = "peer.key"\ndata_dir = "state"\n\n'
        f'[control]\nhost = "127.0.0.1"\nport = {port}\n'
    )
    return config


def test_cli_without_a_running_peer_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _write_config(tmp_path, port)
    ensure_token_file(tmp_path / "state" / TOKEN_FILE_NAME)
    result = CliRunner().invoke(models, ["list", "--config", str(config)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: cannot reach the peer's control API at 127.0.0.1:{port} — "
        "is 'silomesh peer run' running?"
    )


def test_cli_without_a_token_file_points_at_peer_run(tmp_path: Path) -> None:
    config = _write_config(tmp_path, 8787)
    result = CliRunner().invoke(data, ["list", "--config", str(config)])
    assert result.exit_code == 1
    assert "no control token file" in result.output and "silomesh peer run" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_with_a_broken_config_gives_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(approvals, ["list", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 1
    assert "no such file" in result.output
    assert "Traceback" not in result.output


def test_register_puts_the_commands_under_the_root_group() -> None:
    import click

    root = click.Group("silomesh")
    register(root)
    peer = root.commands["peer"]
    assert isinstance(peer, click.Group)
    assert {"status", "rounds"} <= set(peer.commands)
    assert {"data", "models", "approvals", "neighbours"} <= set(root.commands)
    assert "dashboard" in peer.commands
    for command in (peer_status, peer_rounds, peer_dashboard, neighbours, data, models, approvals):
        assert "Example" in (command.help or "")


async def test_real_server_on_port_0_serves_the_cli_and_closes_on_cancel(
    tmp_path: Path, operator: FakeOperator
) -> None:
    token_file = tmp_path / "state" / TOKEN_FILE_NAME
    runner = CliRunner()

    def cli(group: click.Command, *args: str) -> Result:
        return runner.invoke(group, [*args, "--config", str(config)], catch_exceptions=False)

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_control, operator, "127.0.0.1", 0, token_file)
            assert port > 0
            assert os.stat(token_file).st_mode & 0o777 == 0o600
            config = _write_config(tmp_path, port)

            listed = await trio.to_thread.run_sync(cli, models, "list", "--json")
            assert listed.exit_code == 0, listed.output
            assert [m["digest"] for m in json.loads(listed.stdout)] == [DIGEST_A, DIGEST_B]

            table = await trio.to_thread.run_sync(cli, models, "list")
            assert "baseline" in table.output and DIGEST_A[:12] in table.output

            out = tmp_path / "model.pt"
            exported = await trio.to_thread.run_sync(
                cli, models, "export", "baseline", "--out", str(out)
            )
            assert exported.exit_code == 0, exported.output
            assert out.read_bytes() == f"pt:{DIGEST_A}".encode() * 1000

            weights = tmp_path / "init.safetensors"
            weights.write_bytes(b"\x00" * 100)
            imported = await trio.to_thread.run_sync(cli, models, "import", str(weights), "--json")
            assert imported.exit_code == 0, imported.output
            assert operator.imported == [(b"\x00" * 100, "init.safetensors")]

            refused = await trio.to_thread.run_sync(cli, models, "delete", "ffff", "--yes")
            assert (refused.exit_code, refused.output) == (1, "Error: no model 'ffff'\n")

            approved = await trio.to_thread.run_sync(cli, approvals, "approve", "7")
            assert approved.exit_code == 0 and operator.approvals_[0]["status"] == "approved"

            shown = await trio.to_thread.run_sync(cli, peer_dashboard)
            url = shown.stdout.strip()
            assert shown.exit_code == 0 and url.startswith(f"http://127.0.0.1:{port}/dashboard/login?code=")
            async with httpx.AsyncClient(trust_env=False) as browser:
                login = await browser.get(url)
                assert login.status_code == 303 and "httponly" in login.headers["set-cookie"].lower()
                assert (await browser.get(f"http://127.0.0.1:{port}/dashboard/")).status_code == 200
            nursery.cancel_scope.cancel()

    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
