"""``silomesh doctor``: is this peer set up right, and can it reach its neighbours?

One command for a hospital's IT staff, before and during a federation. It checks, in
order: the configuration and the key file; whether the peer runs (its local control
API); whether neighbours can dial this peer (their AutoNAT verdicts); its relay
reservations; and each trusted neighbour: connected or not, direct, relayed or upgraded,
round-trip time. Every failed check carries one line that says what to do: which port,
which address, which key.

The checks of a running peer read what the peer itself measured (``/api/status`` and
``/api/neighbours``): the doctor opens no connection of its own to the neighbours, so it
needs no second identity and cannot disturb the federation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from silomesh.peer.config import ConfigError, PeerConfig, TrustedPeer, load_config
from silomesh.peer.control_client import ControlClient, ControlError
from silomesh.peer.identity import load_key_file

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, how it went, and what to do when it did not."""

    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    neighbours: list[dict[str, Any]] = field(default_factory=list)
    peer_id: str | None = None
    #: the running peer's resumed-transfer counters (its status's ``transfers``)
    transfers: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def add(self, name: str, status: str, detail: str, fix: str | None = None) -> None:
        self.checks.append(Check(name, status, detail, fix))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "peer_id": self.peer_id,
            "checks": [asdict(c) for c in self.checks],
            "neighbours": self.neighbours,
            "transfers": self.transfers,
        }


def _host_port(address: str) -> tuple[str, str]:
    parts = address.split("/")
    return (parts[2], parts[4]) if len(parts) > 4 else (address, "?")


def _relay_of(address: str) -> str:
    return address.rstrip("/").removesuffix("/p2p-circuit")


def diagnose(
    config_path: Path, client_factory: Callable[[Path], ControlClient] = ControlClient.from_config
) -> Report:
    """Run every check on the peer configured in ``config_path``."""
    report = Report()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        report.add("config", FAIL, str(exc), f"fix the field named above in {config_path}")
        return report
    report.add("config", OK, f"{config_path} is valid ({len(config.trusted)} trusted neighbours)")
    try:
        identity = load_key_file(config.key_file)
    except Exception as exc:  # noqa: BLE001 - any unreadable key is this one finding
        report.add(
            "key", FAIL, f"{config.key_file}: {exc}",
            f"point key_file at this hospital's key, or make one: silomesh keygen --out {config.key_file.parent}",
        )
        return report
    report.peer_id = identity.peer_id_text
    report.add("key", OK, f"{config.key_file} holds PeerID {identity.peer_id_text}")
    _check_listen(report, config)

    try:
        with client_factory(config_path) as client:
            status = client.status()
            neighbours = client.neighbours()
    except ControlError as exc:
        report.add("peer", FAIL, f"the peer is not running or its control API does not answer: {exc}",
                   f"start it: silomesh peer run --config {config_path}")
        return report
    if status.get("peer_id") != identity.peer_id_text:
        report.add(
            "peer", FAIL,
            f"the running peer uses PeerID {status.get('peer_id')}, the key file holds {identity.peer_id_text}",
            f"restart the peer so it loads {config.key_file}, or point key_file at the key it runs with",
        )
    else:
        report.add("peer", OK, f"running, round {status.get('round')}, phase {status.get('phase')}, "
                               f"health {status.get('health')}")
    _check_reachability(report, config, status)
    _check_relay(report, config, status)
    _check_strangers(report, status)
    _check_transfers(report, status)
    for row in neighbours:
        trusted = next((t for t in config.trusted if t.peer_id == row.get("peer_id")), None)
        if trusted is not None:
            _check_neighbour(report, config, trusted, row, identity.peer_id_text)
    return report


def _check_listen(report: Report, config: PeerConfig) -> None:
    host, port = _host_port(config.listen)
    loopback = host.startswith("127.") or host == "::1"
    remote = [t for t in config.trusted if not _host_port(t.address)[0].startswith("127.")]
    if loopback and remote:
        report.add("listen", FAIL, f"listening on {config.listen}: only this machine can connect",
                   f"listen = \"/ip4/0.0.0.0/tcp/{port}\" (or this host's LAN address) in {config.path}")
    else:
        report.add("listen", OK, f"listening on {config.listen}")


def _check_reachability(report: Report, config: PeerConfig, status: dict[str, Any]) -> None:
    reach = status.get("reachability") or {}
    verdict = reach.get("status", "unknown")
    _, port = _host_port(config.listen)
    held = [r for r in (status.get("relay") or {}).get("reservations", []) if r.get("held")]
    said = ", ".join(f"{p[-8:]}={'yes' if v else 'no'}" for p, v in (reach.get("verdicts") or {}).items())
    names = {t.peer_id: t.name for t in config.trusted}
    dialled_in = [names.get(p, p) for p in reach.get("dialled_in_by") or []]
    if dialled_in:
        report.add("reachable", OK, f"neighbours can dial us on TCP {port}: {', '.join(dialled_in)} did, directly")
    elif verdict == "public":
        report.add("reachable", WARN, f"neighbours see us at the address we listen on (dial-back: {said}), "
                                      "but none has dialled us yet",
                   f"if neighbours cannot connect, allow inbound TCP {port} from their addresses")
    elif held:
        report.add("reachable", OK, f"neighbours cannot dial us directly ({said or 'not asked'}); "
                                    f"they reach us through relay {held[0]['relay']}")
    elif verdict == "private":
        report.add(
            "reachable", FAIL, f"no neighbour could dial us back on TCP {port} ({said})",
            f"allow inbound TCP {port} from the neighbours' addresses to this host (forward it on the NAT), "
            "or reserve a slot on a neighbour's relay: [relay] via = [\"<its address>/p2p/<its PeerID>\"]",
        )
    else:
        report.add("reachable", WARN, "not known yet: no neighbour has dialled us or answered a dial-back request",
                   None)


def _check_relay(report: Report, config: PeerConfig, status: dict[str, Any]) -> None:
    relay = status.get("relay") or {}
    if config.relay.serve:
        report.add("relay-service", OK, "relaying circuits for trusted neighbours ([relay] serve = true)")
    for r in relay.get("reservations", []):
        host, port = _host_port(r["relay"])
        if r.get("held"):
            report.add("relay", OK, f"reservation held on {r['relay']}")
        else:
            report.add(
                "relay", FAIL, f"no reservation on {r['relay']} (attempts {r.get('attempts')}: {r.get('last_error')})",
                f"allow outbound TCP to {host}:{port}; the relay's peer.toml needs [relay] serve = true and "
                f"this peer ({report.peer_id}) in its [[trusted]]",
            )


def _check_strangers(report: Report, status: dict[str, Any]) -> None:
    strangers = status.get("stranger_peer_ids") or []
    if strangers:
        report.add(
            "strangers", WARN,
            f"{status.get('strangers_refused')} connections refused from PeerIDs we do not trust: "
            + ", ".join(strangers[:3]),
            "if one of these is a neighbour, its key changed: put its new PeerID in [[trusted]] peer_id",
        )


def _check_transfers(report: Report, status: dict[str, Any]) -> None:
    t = status.get("transfers") or {}
    report.transfers = dict(t)
    if t.get("partials_kept") or t.get("resumed_sends"):
        report.add(
            "transfers", OK,
            f"links broke mid-transfer: {t.get('partials_kept', 0)} incoming updates kept to resume, "
            f"{t.get('resumed_receives', 0)} resumed ({t.get('bytes_resumed', 0) / 1e6:.1f} MB not sent again); "
            f"{t.get('resumed_sends', 0)} of our updates resumed ({t.get('bytes_not_resent', 0) / 1e6:.1f} MB)",
        )


def _check_neighbour(report: Report, config: PeerConfig, t: TrustedPeer, row: dict[str, Any], me: str) -> None:
    name = f"neighbour {t.name}"
    summary = {
        "name": t.name, "peer_id": t.peer_id, "address": t.address,
        "connected": bool(row.get("connected")), "connection": row.get("connection"),
        "rtt_ms": row.get("rtt_ms"), "reconnects": row.get("reconnects", 0),
        "dial_failures": row.get("dial_failures", 0), "last_dial_error": row.get("last_dial_error"),
    }
    report.neighbours.append(summary)
    if row.get("connected"):
        rtt = f", RTT {row['rtt_ms']:.1f} ms" if isinstance(row.get("rtt_ms"), int | float) else ""
        report.add(name, OK, f"connected, {row.get('connection') or 'direct'}{rtt}, "
                             f"{row.get('reconnects', 0)} reconnects")
        return
    error = row.get("last_dial_error") or "not dialled yet"
    host, port = _host_port(t.address)
    if "circuit" in t.address:
        fix = (f"{t.name} must hold a reservation on relay {_relay_of(t.address)} ([relay] via in its peer.toml), "
               f"and the relay must trust both {t.name} and us ({me})")
    elif "mismatch" in error.lower() or "peer id" in error.lower():
        fix = (f"{t.name} at {host}:{port} answered with another key: check [[trusted]] peer_id {t.peer_id} "
               "against its 'silomesh keygen' output")
    else:
        fix = (f"{t.name} must allow inbound TCP {port} from our address to {host}; if it is behind NAT it dials us "
               f"instead (it must list us, {me}, in its [[trusted]]) or give us its relayed address")
    report.add(name, FAIL, f"not connected ({row.get('failures_in_a_row', 0)} failed dials in a row: {error})", fix)


def render(report: Report) -> list[str]:
    """The report as text lines: one per check, plus one 'fix:' line under each failure."""
    marks = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    lines = []
    for c in report.checks:
        lines.append(f"[{marks[c.status]}] {c.name}: {c.detail}")
        if c.fix and c.status != OK:
            lines.append(f"       fix: {c.fix}")
    lines.append("all checks passed" if report.ok else "some checks failed")
    return lines
