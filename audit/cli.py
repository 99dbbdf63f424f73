"""``silomesh audit ...``: offline verification, proofs, reports and reconciliation of audit logs.

Exported: :data:`audit`, the click group the main CLI registers. Every command reads a
log read-only: a peer's ``store.sqlite``, its data folder, or a JSONL export. Exit codes
follow ``cmp``/``diff``: 0 intact / proved / matched, 1 a check failed (the report says
which entry and what), 2 the input could not be used (one line on stderr).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from silomesh.audit.entries import CHECKPOINT_SECONDS, DIRECTIONS, AuditError, TreeHead
from silomesh.audit.logfile import LoadedLog, export_csv, export_jsonl, load_log
from silomesh.audit.privacy import check_spending
from silomesh.audit.proofs import check_consistency, check_inclusion, consistency, head_of, inclusion
from silomesh.audit.reconcile import Discrepancy, ReconcileReport, reconcile
from silomesh.audit.verify import verify_log
from silomesh.protocol.peerid import PeerIdError, public_key_from_peer_id

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
F = TypeVar("F", bound=Callable[..., Any])


class AuditInputError(click.ClickException):
    """The input (a log, head, proof or key) cannot be used: exit status 2."""

    exit_code = 2


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")(func)


def _key_option(func: F) -> F:
    return click.option(
        "--key",
        "key_text",
        metavar="PUBKEY",
        help="The writer's expected Ed25519 public key (64 hex digits) or PeerID; a mismatch is reported.",
    )(func)


_LOG_ARG = click.argument("log", type=click.Path(path_type=Path))


def _load(path: Path) -> LoadedLog:
    try:
        return load_log(path)
    except (AuditError, OSError) as exc:
        raise AuditInputError(str(exc)) from None


def _parse_key(text: str | None) -> bytes | None:
    if text is None:
        return None
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        try:
            return public_key_from_peer_id(text)
        except PeerIdError:
            raise AuditInputError(f"--key {text!r} is neither 64 hex digits nor an Ed25519 PeerID") from None
    if len(key) != 32:
        raise AuditInputError(f"--key must be a 32-byte public key (64 hex digits), got {len(key)} bytes")
    return key


def _read_json(path: Path, what: str) -> Any:  # noqa: ANN401 - json.loads; each caller checks its fields
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditInputError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditInputError(f"{what} {path} is not a JSON file: {exc}") from None


def _read_head(path: Path) -> TreeHead:
    try:
        return TreeHead.from_json(_read_json(path, "head"))
    except AuditError as exc:
        raise AuditInputError(f"{path}: {exc}") from None


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _short(peer_id: str | None) -> str:
    if not peer_id:
        return "-"
    return peer_id if len(peer_id) <= 10 else f"…{peer_id[-8:]}"


def _when(at_ms: object) -> str:
    if not isinstance(at_ms, int):
        return "-"
    return datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _console() -> Console:
    """A terminal-wide console, or a wide one when the output goes to a file (no cropped cells)."""
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 250)


@click.group(context_settings=CONTEXT)
def audit() -> None:
    """Verify, inspect, prove and reconcile peers' signed exchange logs (offline, read-only).

    LOG is a peer's store.sqlite, its data folder, or a JSONL export. Exit status:
    0 intact, 1 a check failed (with the entry number and what is wrong), 2 unusable input.

    \b
    Examples:
      silomesh audit verify /var/lib/silomesh/store.sqlite
      silomesh audit reconcile hospA/store.sqlite hospB/store.sqlite hospC/store.sqlite
    """


@audit.command(context_settings=CONTEXT)
@_LOG_ARG
@_key_option
@click.option(
    "--head",
    "head_files",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    help="A signed tree head kept from earlier ('silomesh audit head'); the log must still contain it.",
)
@_json_option
def verify(log: Path, key_text: str | None, head_files: tuple[Path, ...], as_json: bool) -> None:
    """Check a log's hash chain, every entry's and envelope's signature, and its signed heads.

    Every entry must be signed by the log's writer and chained to the previous one; every
    recorded envelope signature must verify with its sender's key (the neighbour for
    received entries, the writer for sent ones); every signed checkpoint must match the
    entries it covers, so a truncated tail is found. Modified, deleted, inserted and
    reordered entries are reported by entry number.

    \b
    Example:
      silomesh audit verify peers/p0/store.sqlite --key 3b6a27bc...  # pin the writer's key
      silomesh audit verify export.jsonl --head head-2024-06-01.json --json
    """
    loaded = _load(log)
    heads = [_read_head(p) for p in head_files]
    try:
        report = verify_log(loaded, key=_parse_key(key_text), heads=heads)
    except AuditError as exc:
        raise AuditInputError(str(exc)) from None
    if as_json:
        _echo_json(report.to_json())
    else:
        click.echo(report.summary())
        for f in report.findings:
            where = f"entry {f.entry}" if f.entry is not None else "log"
            click.echo(f"  {where}: [{f.code}] {f.message}")
    if not report.ok:
        sys.exit(1)


def _matches(
    entry: dict[str, Any], peer: str | None, round_: int | None, kind: str | None, direction: str | None
) -> bool:
    if peer and peer not in str(entry.get("peer") or ""):
        return False
    if round_ is not None and entry.get("round") != round_:
        return False
    if kind and entry.get("kind") != kind:
        return False
    return not (direction and entry.get("direction") != direction)


@audit.command(context_settings=CONTEXT)
@_LOG_ARG
@click.option("--peer", help="Only entries with this neighbour (its PeerID or a part of it).")
@click.option("--round", "round_", type=int, help="Only entries of this round.")
@click.option("--kind", help="Only entries of this message kind (update, ack, hello, train-request...).")
@click.option("--direction", type=click.Choice(DIRECTIONS), help="Only sent, received or refused entries.")
@_json_option
def show(
    log: Path, peer: str | None, round_: int | None, kind: str | None, direction: str | None, as_json: bool
) -> None:
    """Show a log's entries as a table: who sent what to whom, when, how large, which digest.

    Shows the log as recorded; it does not verify it (use 'silomesh audit verify').

    \b
    Example:
      silomesh audit show peers/p0 --round 3 --direction received
    """
    loaded = _load(log)
    rows = [e for e in loaded.entries if _matches(e, peer, round_, kind, direction)]
    if as_json:
        _echo_json({"source": loaded.source, "peer_id": loaded.writer_peer_id, "entries": rows})
        return
    me = loaded.writer_peer_id or "this peer"
    table = Table(
        title=f'audit log of {me} ("self"): {len(rows)} of {len(loaded.entries)} entries',
        title_justify="left",
        caption="peers are shown by the end of their PeerID; --json gives everything in full",
    )
    widths = {
        "#": 3,
        "time (UTC)": 12,
        "direction": 8,
        "from": 9,
        "to": 9,
        "round": 5,
        "kind": 6,
        "bytes": 7,
        "payload digest": 12,
    }
    for column in ("#", "time (UTC)", "direction", "from", "to", "round", "kind", "bytes", "payload digest", "note"):
        table.add_column(
            column,
            justify="right" if column in ("#", "round", "bytes") else "left",
            overflow="fold",
            min_width=widths.get(column),
        )
    for e in rows:
        sent = e.get("direction") == "sent"
        sender, recipient = ("self", _short(e.get("peer"))) if sent else (_short(e.get("peer")), "self")
        digest = str(e.get("payload_digest") or "")
        table.add_row(
            str(e.get("seq")),
            _when(e.get("at_ms")),
            str(e.get("direction")),
            sender,
            recipient,
            "-" if e.get("round") in (None, -1) else str(e.get("round")),
            str(e.get("kind")),
            f"{e.get('size') or 0:,}",
            digest[:12] or "-",
            str(e.get("reason") or ""),
        )
    _console().print(table)


@audit.command(context_settings=CONTEXT)
@_LOG_ARG
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of stdout.")
def export(log: Path, fmt: str, out: Path | None) -> None:
    """Export a log's entries (JSONL also carries the writer and the signed heads).

    A JSONL export verifies like the store it came from ('silomesh audit verify FILE').

    \b
    Example:
      silomesh audit export peers/p0 --format jsonl --out p0-audit.jsonl
      silomesh audit export peers/p0 --format csv > p0-audit.csv
    """
    loaded = _load(log)
    text = "\n".join(export_jsonl(loaded)) + "\n" if fmt == "jsonl" else export_csv(loaded)
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise AuditInputError(f"cannot write {out}: {exc.strerror}") from None
    click.echo(f"wrote {len(loaded.entries)} entries to {out}", err=True)


@audit.command(context_settings=CONTEXT)
@_LOG_ARG
@click.option("--size", type=int, help="Print the signed head of this size instead of the latest one.")
@click.option("--list", "list_heads", is_flag=True, help="List every signed head (size, time, root) instead.")
def head(log: Path, size: int | None, list_heads: bool) -> None:
    """Print the log's most recent signed tree head as JSON, for an auditor to keep.

    A running peer signs a head at each round end, within 64 entries and within 60 s
    of any entry, and when it stops: the latest head covers all but the last moments
    of a running peer's log, and all of a cleanly stopped one's. Entries after it, if
    any, are counted on stderr. A kept head later shows that the log was not truncated
    or rewritten ('silomesh audit verify LOG --head FILE', 'silomesh audit
    verify-consistency --first FILE') and anchors inclusion proofs.

    \b
    Example:
      silomesh audit head peers/p0 > p0-head.json        # the latest: keep this
      silomesh audit head peers/p0 --size 128 > p0-head-128.json
      silomesh audit head peers/p0 --list
    """
    loaded = _load(log)
    if list_heads:
        for h in loaded.checkpoints:
            click.echo(f"{h.size:>8}  {_when(h.at_ms)}  {h.root_hash}")
        if not loaded.checkpoints:
            click.echo(f"{loaded.source} has no signed head yet", err=True)
        return
    try:
        chosen = head_of(loaded, size)
    except AuditError as exc:
        raise AuditInputError(str(exc)) from None
    _echo_json(chosen.to_json())
    last = max((e["seq"] for e in loaded.entries if type(e.get("seq")) is int), default=0)
    if size is None and last > chosen.size:
        click.echo(
            f"note: entries {chosen.size + 1}-{last} are not covered by a signed head yet (a running peer "
            f"signs them within {CHECKPOINT_SECONDS:.0f} s; a stopped one stopped without signing its tail)",
            err=True,
        )


@audit.command(context_settings=CONTEXT)
@_LOG_ARG
@click.argument("entry", type=int)
@click.option("--size", type=int, help="Prove against the signed head of this size (default: the latest).")
def prove(log: Path, entry: int, size: int | None) -> None:
    """Print an inclusion proof (JSON) that entry number ENTRY is in the log under a signed head.

    \b
    Example:
      silomesh audit prove peers/p0 17 > proof.json
      silomesh audit verify-proof proof.json --head p0-head.json
    """
    loaded = _load(log)
    try:
        _echo_json(inclusion(loaded, entry, size))
    except AuditError as exc:
        raise AuditInputError(str(exc)) from None


@audit.command(name="verify-proof", context_settings=CONTEXT)
@click.argument("proof", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--head",
    "head_file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The signed tree head you trust (JSON from 'silomesh audit head').",
)
@_key_option
@_json_option
def verify_proof(proof: Path, head_file: Path, key_text: str | None, as_json: bool) -> None:
    """Check an inclusion proof from 'silomesh audit prove' against a signed tree head.

    The head's signature, the entry's hash and signature, and the audit path up to the
    head's root hash are all checked.

    \b
    Example:
      silomesh audit verify-proof proof.json --head p0-head.json
    """
    obj = _read_json(proof, "proof")
    if not isinstance(obj, dict):
        raise AuditInputError(f"{proof} is not an inclusion proof")
    trusted = _read_head(head_file)
    problems = check_inclusion(obj, trusted, _parse_key(key_text))
    entry = obj.get("entry")
    if not isinstance(entry, dict):
        entry = {}
    _verdict(
        as_json,
        problems,
        f"entry {entry.get('seq')} is in the log of {trusted.peer_id} under its signed head of size {trusted.size}",
    )


def _verdict(as_json: bool, problems: list[str], ok_text: str) -> None:
    if as_json:
        _echo_json({"ok": not problems, "problems": problems})
    elif problems:
        click.echo("FAILED: " + "; ".join(problems))
    else:
        click.echo(f"OK: {ok_text}")
    if problems:
        sys.exit(1)


@audit.command(name="privacy", context_settings=CONTEXT)
@_LOG_ARG
@_key_option
@_json_option
def privacy_cmd(log: Path, key_text: str | None, as_json: bool) -> None:
    """Recompute a peer's DP-SGD spending from its log and check it never passed the target.

    First verifies the log as 'silomesh audit verify' does (the spending entries are
    signed and chained, so the peer cannot rewrite them); then recomputes each round's
    and the cumulative epsilon from the logged noise multiplier, sampling rate and steps
    with the RDP accountant, and reports any entry whose logged epsilon disagrees or
    whose cumulative epsilon exceeds the target.

    \b
    Example:
      silomesh audit privacy hospA/store.sqlite --key 12D3KooW...
      silomesh audit privacy export.jsonl --json
    """
    loaded = _load(log)
    try:
        verified = verify_log(loaded, key=_parse_key(key_text))
        report = check_spending(loaded.entries)
    except AuditError as exc:
        raise AuditInputError(str(exc)) from None
    problems = [f"log: {f.message}" for f in verified.findings] + report.problems
    if as_json:
        _echo_json({**report.to_json(), "ok": not problems, "problems": problems})
    else:
        table = Table("entry", "round", "steps", "sigma", "q", "eps round", "eps total", "logged total")
        for r in report.rounds:
            table.add_row(str(r["seq"]), str(r["round"]), str(r["steps"]), f"{r['noise_multiplier']:.3f}",
                          f"{r['sample_rate']:.4f}", f"{r['epsilon_round']:.4f}", f"{r['epsilon_total']:.4f}",
                          f"{r['logged_epsilon_total']:.4f}")
        if report.rounds:
            _console().print(table)
        if report.delta is None:
            click.echo("no privacy spending logged (the peer trained without [privacy])")
        else:
            click.echo(f"cumulative epsilon {report.epsilon_total:.4f} of target {report.target_epsilon:g} "
                       f"at delta {report.delta:g}")
    if problems:
        if not as_json:
            click.echo("FAILED: " + "; ".join(problems))
        sys.exit(1)
    if not as_json:
        click.echo("OK: every logged round adds up and the total stays within the target")


@audit.command(name="consistency", context_settings=CONTEXT)
@_LOG_ARG
@click.option("--from", "first", type=int, required=True, help="Size of the earlier signed head.")
@click.option("--to", "second", type=int, help="Size of the later signed head (default: the latest).")
def consistency_cmd(log: Path, first: int, second: int | None) -> None:
    """Print a proof (JSON) that the log's signed head of size --to extends the one of size --from.

    \b
    Example:
      silomesh audit consistency peers/p0 --from 12 --to 40 > consistency.json
      silomesh audit verify-consistency consistency.json --first p0-head-12.json
    """
    loaded = _load(log)
    try:
        _echo_json(consistency(loaded, first, second))
    except AuditError as exc:
        raise AuditInputError(str(exc)) from None


@audit.command(name="verify-consistency", context_settings=CONTEXT)
@click.argument("proof", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--first",
    "first_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The earlier head you kept; it must be the proof's first head.",
)
@_key_option
@_json_option
def verify_consistency_cmd(proof: Path, first_file: Path | None, key_text: str | None, as_json: bool) -> None:
    """Check a consistency proof: both heads signed by the writer, the later one extending the earlier.

    \b
    Example:
      silomesh audit verify-consistency consistency.json --first p0-head-12.json
    """
    obj = _read_json(proof, "proof")
    if not isinstance(obj, dict):
        raise AuditInputError(f"{proof} is not a consistency proof")
    problems = check_consistency(obj, _parse_key(key_text))
    if first_file is not None:
        kept = _read_head(first_file)
        if kept.to_json() != obj.get("first"):
            problems.append("the proof's first head is not the head you kept")
    first, second = obj.get("first") or {}, obj.get("second") or {}
    _verdict(
        as_json, problems, f"the signed head of size {second.get('size')} extends the one of size {first.get('size')}"
    )


@audit.command(name="reconcile", context_settings=CONTEXT)
@click.argument("logs", nargs=-1, required=True, type=click.Path(path_type=Path))
@_json_option
def reconcile_cmd(logs: tuple[Path, ...], as_json: bool) -> None:
    """Match every send between these peers against the receiver's record of it.

    A send matches the receive of the same envelope signature between the same two
    peers, or the recipient's refusal of that envelope (listed apart, with the reason:
    not a discrepancy); reported are sends never recorded as received, receives never
    recorded as sent, and pairs whose payload digest, signature or record differ. Sends
    to peers whose log is not given are counted as unchecked. Secure aggregation: each
    aggregator's commit is checked against the masked vectors it recorded receiving, and
    each member's release against the commits the aggregator logged.

    \b
    Example:
      silomesh audit reconcile peers/p0 peers/p1 peers/p2 --json
    """
    if len(logs) < 2:
        raise AuditInputError("reconcile needs the logs of at least two peers")
    loaded = [_load(p) for p in logs]
    try:
        report = reconcile(loaded)
    except AuditError as exc:
        raise AuditInputError(str(exc)) from None
    if as_json:
        _echo_json(report.to_json())
    else:
        _print_reconcile(report)
    if not report.ok:
        sys.exit(1)


def _print_reconcile(report: ReconcileReport) -> None:
    rows, refused = report.discrepancies, report.refused
    verdict = "OK" if not rows else "FAILED"
    click.echo(
        f"{verdict}: {len(report.logs)} logs, {report.matched} sends matched to receives, {len(rows)} discrepancies"
        + (f", {report.unchecked_sends} sends to peers whose log was not given" if report.unchecked_sends else "")
        + (f"; {len(refused)} sends refused by their recipient (listed below, not discrepancies)" if refused else "")
    )
    if rows:
        _print_discrepancies(rows)
    if refused:
        table = Table(title="refused by the recipient", title_justify="left")
        for column in ("from", "to", "round", "kind", "sender #", "receiver #", "reason"):
            table.add_column(column, overflow="fold", max_width=100 if column == "reason" else None)
        for x in refused:
            table.add_row(
                _short(x.sender),
                _short(x.recipient),
                str(x.round),
                x.kind,
                "-" if x.sender_entry is None else str(x.sender_entry),
                str(x.recipient_entry) + (" (also received)" if x.also_received else ""),
                x.reason,
            )
        _console().print(table)


def _print_discrepancies(rows: Iterable[Discrepancy]) -> None:
    table = Table(title_justify="left")
    for column in ("problem", "from", "to", "round", "kind", "sender #", "receiver #", "detail"):
        table.add_column(column, overflow="fold", max_width=100 if column == "detail" else None)
    for d in rows:
        table.add_row(
            d.code,
            _short(d.sender),
            _short(d.recipient),
            str(d.round),
            d.kind,
            "-" if d.sender_entry is None else str(d.sender_entry),
            "-" if d.recipient_entry is None else str(d.recipient_entry),
            d.detail,
        )
    _console().print(table)
