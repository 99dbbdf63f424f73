"""`silomesh doctor` and `[relay]`: each finding, and the one line that says what to fix."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from click.testing import CliRunner
from peerkit import identity

from silomesh.peer.cli import cli
from silomesh.peer.config import ConfigError, parse_config
from silomesh.peer.control_client import ControlError
from silomesh.peer.doctor import FAIL, OK, WARN, diagnose, render
from silomesh.peer.identity import write_key_file

B, C = identity("b").peer_id_text, identity("c").peer_id_text
RELAY = identity("r").peer_id_text


def _setup(tmp_path: Path, *, listen: str = "/ip4/0.0.0.0/tcp/4001", relay: str = "") -> tuple[Path, str]:
    me = write_key_file(tmp_path / "peer.key").peer_id_text
    (tmp_path / "peer.toml").write_text(f"""
federation = "doc"
key_file = "peer.key"
listen = "{listen}"
{relay}
[[trusted]]
name = "b"
peer_id = "{B}"
address = "/ip4/10.9.0.2/tcp/4002"

[[trusted]]
name = "c"
peer_id = "{C}"
address = "/ip4/10.9.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit"
""")
    return tmp_path / "peer.toml", me


class FakeClient:
    def __init__(self, status: dict[str, Any], neighbours: list[dict[str, Any]]) -> None:
        self._status, self._neighbours = status, neighbours

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return self._status

    def neighbours(self) -> list[dict[str, Any]]:
        return self._neighbours


def _status(me: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "peer_id": me, "round": 3, "phase": "waiting", "health": "ok",
        "reachability": {"status": "unknown", "verdicts": {}, "dialled_in_by": []},
        "relay": {"serving": False, "reservations": []}, "stranger_peer_ids": [], "strangers_refused": 0,
    }
    base.update(overrides)
    return base


def _by_name(report: Any) -> dict[str, Any]:  # noqa: ANN401
    return {c.name: c for c in report.checks}


def test_a_bad_config_is_one_failure_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "peer.toml").write_text('federation = "x"\nkey_file = "k"\nlisten = "nonsense"\n')
    report = diagnose(tmp_path / "peer.toml")
    assert [c.status for c in report.checks] == [FAIL]
    assert "listen" in report.checks[0].detail and not report.ok


def test_a_missing_key_says_how_to_make_one(tmp_path: Path) -> None:
    config, _ = _setup(tmp_path)
    (tmp_path / "peer.key").unlink()
    check = _by_name(diagnose(config))["key"]
    assert check.status == FAIL and "silomesh keygen --out" in (check.fix or "")


def test_a_peer_that_does_not_run_is_reported_with_the_command_to_start_it(tmp_path: Path) -> None:
    config, _ = _setup(tmp_path)

    def refuse(path: Path) -> FakeClient:
        raise ControlError("control API at 127.0.0.1:8787 does not answer")

    check = _by_name(diagnose(config, refuse))["peer"]  # type: ignore[arg-type]
    assert check.status == FAIL and "silomesh peer run --config" in (check.fix or "")


def test_a_running_peer_with_another_key_is_a_key_mismatch(tmp_path: Path) -> None:
    config, _ = _setup(tmp_path)
    client = FakeClient(_status(B), [])
    check = _by_name(diagnose(config, lambda p: client))["peer"]  # type: ignore[arg-type,return-value]
    assert check.status == FAIL and B in check.detail


def test_unreachable_without_a_relay_names_the_port_to_open(tmp_path: Path) -> None:
    config, me = _setup(tmp_path)
    status = _status(me, reachability={"status": "private", "verdicts": {B: False}, "dialled_in_by": []})
    check = _by_name(diagnose(config, lambda p: FakeClient(status, [])))["reachable"]  # type: ignore[arg-type,return-value]
    assert check.status == FAIL and "TCP 4001" in (check.fix or "") and "[relay] via" in (check.fix or "")


def test_behind_nat_with_a_relay_reservation_is_fine(tmp_path: Path) -> None:
    config, me = _setup(tmp_path, relay=f'[relay]\nvia = ["/ip4/10.9.0.1/tcp/4001/p2p/{RELAY}"]\n')
    relay = {"serving": False, "reservations": [{"relay": f"/ip4/10.9.0.1/tcp/4001/p2p/{RELAY}", "held": True}]}
    status = _status(me, reachability={"status": "private", "verdicts": {B: False}, "dialled_in_by": []}, relay=relay)
    checks = _by_name(diagnose(config, lambda p: FakeClient(status, [])))  # type: ignore[arg-type,return-value]
    assert checks["reachable"].status == OK and "through relay" in checks["reachable"].detail
    assert checks["relay"].status == OK


def test_a_refused_reservation_says_what_the_relay_must_have(tmp_path: Path) -> None:
    config, me = _setup(tmp_path, relay=f'[relay]\nvia = ["/ip4/10.9.0.1/tcp/4001/p2p/{RELAY}"]\n')
    relay = {"serving": False, "reservations": [
        {"relay": f"/ip4/10.9.0.1/tcp/4001/p2p/{RELAY}", "held": False, "attempts": 4, "last_error": "timed out"}]}
    check = _by_name(diagnose(config, lambda p: FakeClient(_status(me, relay=relay), [])))["relay"]  # type: ignore[arg-type,return-value]
    assert check.status == FAIL
    assert "10.9.0.1:4001" in (check.fix or "") and "serve = true" in (check.fix or "") and me in (check.fix or "")


def test_each_neighbour_shows_its_link_or_what_to_fix(tmp_path: Path) -> None:
    config, me = _setup(tmp_path)
    rows = [
        {"peer_id": B, "connected": True, "connection": "upgraded", "rtt_ms": 12.5, "reconnects": 2},
        {"peer_id": C, "connected": False, "connection": None, "failures_in_a_row": 3, "last_dial_error": "timed out"},
    ]
    status = _status(me, reachability={"status": "public", "verdicts": {}, "dialled_in_by": [B]})
    report = diagnose(config, lambda p: FakeClient(status, rows))  # type: ignore[arg-type,return-value]
    checks = _by_name(report)
    assert checks["neighbour b"].status == OK and "upgraded" in checks["neighbour b"].detail
    assert "12.5 ms" in checks["neighbour b"].detail
    assert checks["neighbour c"].status == FAIL and "reservation on relay" in (checks["neighbour c"].fix or "")
    assert checks["reachable"].status == OK and "b did" in checks["reachable"].detail
    lines = render(report)
    assert any(line.startswith("[FAIL] neighbour c") for line in lines)
    assert any(line.strip().startswith("fix:") for line in lines) and lines[-1] == "some checks failed"
    assert [n["connection"] for n in report.as_dict()["neighbours"]] == ["upgraded", None]


def test_a_direct_neighbour_that_cannot_be_reached_names_its_port_and_address(tmp_path: Path) -> None:
    config, me = _setup(tmp_path)
    rows = [{"peer_id": B, "connected": False, "last_dial_error": "SwarmDialAllFailedError"}]
    check = _by_name(diagnose(config, lambda p: FakeClient(_status(me), rows)))["neighbour b"]  # type: ignore[arg-type,return-value]
    assert check.status == FAIL and "TCP 4002" in (check.fix or "") and "10.9.0.2" in (check.fix or "")


def test_listening_on_loopback_with_remote_neighbours_fails(tmp_path: Path) -> None:
    config, _ = _setup(tmp_path, listen="/ip4/127.0.0.1/tcp/4001")
    check = _by_name(diagnose(config, lambda p: FakeClient(_status(""), [])))["listen"]  # type: ignore[arg-type,return-value]
    assert check.status == FAIL and "0.0.0.0" in (check.fix or "")


def test_strangers_are_a_warning_about_changed_keys(tmp_path: Path) -> None:
    config, me = _setup(tmp_path)
    status = _status(me, stranger_peer_ids=[RELAY], strangers_refused=5)
    check = _by_name(diagnose(config, lambda p: FakeClient(status, [])))["strangers"]  # type: ignore[arg-type,return-value]
    assert check.status == WARN and "new PeerID" in (check.fix or "")


def test_doctor_command_prints_json_and_exits_1_on_failure(tmp_path: Path) -> None:
    config, _ = _setup(tmp_path)  # no peer runs: no control token
    result = CliRunner().invoke(cli, ["doctor", "--json", "--config", str(config)])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["ok"] is False and {c["name"] for c in data["checks"]} >= {"config", "key", "peer"}


@pytest.mark.parametrize(
    ("relay", "error"),
    [
        ({"via": ["/ip4/1.2.3.4/tcp/4001"]}, "relay.via[0]: expected a relay address ending in /p2p/"),
        ({"via": [f"/ip4/1.2.3.4/tcp/4001/p2p/{RELAY}"], "max_reservations": 0}, "relay.max_reservations"),
        ({"serve": "yes"}, "relay.serve"),
        ({"bogus": 1}, "relay.bogus: unknown field"),
    ],
)
def test_relay_settings_are_checked(tmp_path: Path, relay: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"federation": "x", "key_file": "k", "relay": relay}, tmp_path)


def test_a_relayed_neighbour_address_must_name_the_relay(tmp_path: Path) -> None:
    ok = parse_config({"federation": "x", "key_file": "k", "trusted": [
        {"peer_id": B, "address": f"/ip4/1.2.3.4/tcp/4001/p2p/{RELAY}/p2p-circuit"}]}, tmp_path)
    assert ok.trusted[0].address.endswith("/p2p-circuit")
    with pytest.raises(ConfigError, match="relayed address is"):
        parse_config({"federation": "x", "key_file": "k", "trusted": [
            {"peer_id": B, "address": "/ip4/1.2.3.4/tcp/4001/p2p-circuit"}]}, tmp_path)
