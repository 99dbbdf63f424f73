"""Reconciliation: every send in one peer's audit log should be a receive in the recipient's.

After an incident an auditor collects the logs of the peers involved; :func:`reconcile`
pairs each recorded send with the recipient's record of the same envelope — received, or
refused after it authenticated — and reports what does not pair up. The matching rules
are specified in docs/AUDIT.md.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from silomesh.audit.entries import AuditError, parse_envelope_header
from silomesh.audit.logfile import LoadedLog, writer_key
from silomesh.audit.secagg import COMMIT_KIND, RELEASE_KIND, read_reason
from silomesh.protocol.peerid import PeerIdError, peer_id_from_public_key


@dataclass(frozen=True)
class Discrepancy:
    """A send and a receive that do not match.

    ``code``: unmatched-send (recorded sent, never recorded received), unmatched-receive
    (recorded received, never recorded sent), digest-mismatch, signature-mismatch,
    record-mismatch (same envelope, other kind/round/size/header recorded); for secure
    aggregation (:func:`secagg_discrepancies`): secagg-commit-mismatch (the aggregator's
    commit disagrees with the masked vectors it recorded receiving), secagg-equivocation
    (a member released against a commit the aggregator's log does not hold, or the
    aggregator logged two commits for one round), secagg-unreadable (an entry whose reason
    is not the JSON of docs/AUDIT.md).
    """

    code: str
    sender: str
    recipient: str
    kind: str
    round: int
    sender_entry: int | None
    recipient_entry: int | None
    detail: str


@dataclass(frozen=True)
class Refusal:
    """A send whose envelope the recipient recorded as refused (not a discrepancy: the reason says why).

    ``also_received`` when the recipient's log records the same envelope as received too
    (a refusal after accepting it, as logs written before the refused-once rule do).
    """

    sender: str
    recipient: str
    kind: str
    round: int
    sender_entry: int | None
    recipient_entry: int
    reason: str
    also_received: bool = False


@dataclass
class ReconcileReport:
    """Every pair's sends matched against the recipients' records; ``ok`` when nothing disagrees."""

    logs: list[dict[str, Any]]
    matched: int = 0
    unchecked_sends: int = 0
    discrepancies: list[Discrepancy] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _signed_digest(e: Mapping[str, Any]) -> str | None:
    header = parse_envelope_header(str(e.get("envelope_header"))) if e.get("envelope_header") else None
    return header.payload_digest.hex() if header is not None else None


def _compare(s: Mapping[str, Any], r: Mapping[str, Any]) -> tuple[str, str] | None:
    if s.get("payload_digest") != r.get("payload_digest"):
        signed = _signed_digest(s) or _signed_digest(r)
        detail = f"sender recorded {s.get('payload_digest')}, receiver recorded {r.get('payload_digest')}"
        if signed is not None:
            liar = [n for n, x in (("sender", s), ("receiver", r)) if x.get("payload_digest") != signed]
            detail += f"; the sender-signed header says {signed}: the {' and '.join(liar)}'s record is wrong"
        return "digest-mismatch", detail
    other = [f for f in ("kind", "round", "size", "envelope_header") if s.get(f) != r.get(f)]
    if other:
        return "record-mismatch", f"same envelope, different {', '.join(other)} recorded"
    return None


def _refusal(
    sender: str, recipient: str, send: Mapping[str, Any], refused: Mapping[str, Any], *, also_received: bool
) -> Refusal:
    return Refusal(
        sender,
        recipient,
        str(refused["kind"]),
        int(refused["round"]),
        send["seq"],
        refused["seq"],
        str(refused["reason"] or ""),
        also_received=also_received,
    )


def reconcile(logs: Sequence[LoadedLog]) -> ReconcileReport:
    """Match every send between the given logs' writers against the receiver's record of it.

    A send and a receive match when they are between the same two peers and carry the
    same envelope signature; a send the recipient refused after it authenticated matches
    that ``refused`` entry instead (listed in ``refused``, not a discrepancy). A pair that
    shares kind, round and payload digest but not the signature is a signature mismatch.
    Sends to peers whose log is not given are counted as unchecked.

    Raises:
        AuditError: if a log does not say who wrote it, or two logs have the same writer.
    """
    writers: dict[str, LoadedLog] = {}
    for log in logs:
        key = writer_key(log)
        if key is None:
            raise AuditError(f"{log.source} does not record who wrote it; cannot reconcile it")
        try:
            peer_id = peer_id_from_public_key(key)
        except PeerIdError:
            raise AuditError(f"{log.source}: the recorded writer's key is not an Ed25519 public key") from None
        if peer_id in writers:
            raise AuditError(f"{log.source} and {writers[peer_id].source} were both written by {peer_id}")
        writers[peer_id] = log
    report = ReconcileReport(
        [{"source": lg.source, "peer_id": p, "entries": len(lg.entries)} for p, lg in writers.items()]
    )
    sends: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    receives: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    refusals: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for peer_id, log in writers.items():
        for e in log.entries:
            if e.get("direction") == "sent" and e.get("envelope_sig"):
                if e.get("peer") in writers:
                    sends[(peer_id, str(e["peer"]))].append(e)
                else:
                    report.unchecked_sends += 1
            elif e.get("direction") == "received" and e.get("peer") in writers and e.get("envelope_sig"):
                receives[(str(e["peer"]), peer_id)].append(e)
            elif e.get("direction") == "refused" and e.get("peer") in writers and e.get("envelope_sig"):
                refusals[(str(e["peer"]), peer_id)].append(e)
    out = report.discrepancies
    for pair in sorted(set(sends) | set(receives) | set(refusals)):
        sender, recipient = pair
        by_sig: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in receives.get(pair, []):
            by_sig[str(r["envelope_sig"])].append(r)
        refused_by_sig: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in refusals.get(pair, []):
            refused_by_sig[str(r["envelope_sig"])].append(r)
        pending: list[dict[str, Any]] = []
        for s in sends.get(pair, []):
            sig = str(s["envelope_sig"])
            received = by_sig.get(sig)
            record = received.pop(0) if received else None
            refused = refused_by_sig.pop(sig, [])
            report.refused += [_refusal(sender, recipient, s, x, also_received=record is not None) for x in refused]
            record = record if record is not None else next(iter(refused), None)
            if record is None:
                pending.append(s)
                continue
            report.matched += 1
            diff = _compare(s, record)
            if diff is not None:
                out.append(
                    Discrepancy(
                        diff[0], sender, recipient, str(s["kind"]), int(s["round"]), s["seq"], record["seq"], diff[1]
                    )
                )
        left = [r for rs in by_sig.values() for r in rs]
        # a refused envelope no send accounts for: the sender did not record sending what it signed
        left += [r for rs in refused_by_sig.values() for r in rs]
        for s in pending:
            same = [
                r
                for r in left
                if (r["kind"], r["round"], r["payload_digest"]) == (s["kind"], s["round"], s["payload_digest"])
            ]
            if same:
                r = same[0]
                left.remove(r)
                out.append(
                    Discrepancy(
                        "signature-mismatch",
                        sender,
                        recipient,
                        str(s["kind"]),
                        int(s["round"]),
                        s["seq"],
                        r["seq"],
                        "same kind, round and digest but a different envelope signature recorded",
                    )
                )
            else:
                out.append(
                    Discrepancy(
                        "unmatched-send",
                        sender,
                        recipient,
                        str(s["kind"]),
                        int(s["round"]),
                        s["seq"],
                        None,
                        f"sent (digest {s['payload_digest']}) but not recorded as received",
                    )
                )
        for r in sorted(left, key=lambda x: x["seq"]):
            what = "received" if r["direction"] == "received" else f"refused ({r['reason']})"
            out.append(
                Discrepancy(
                    "unmatched-receive",
                    sender,
                    recipient,
                    str(r["kind"]),
                    int(r["round"]),
                    None,
                    r["seq"],
                    f"{what} (digest {r['payload_digest']}) but not recorded as sent",
                )
            )
    out += secagg_discrepancies({p: lg.entries for p, lg in writers.items()})
    return report


def _local(entries: Sequence[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [e for e in entries if e.get("direction") == "local" and e.get("kind") == kind]


def secagg_discrepancies(logs: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[Discrepancy]:
    """Each aggregator's secure-aggregation commits against its own receipts and its members' releases.

    ``logs``: writer PeerID -> entries. For every ``secagg-commit`` an aggregator logged: each
    member whose masked vector it recorded receiving in that round must be a survivor, and
    each survivor must have such a receipt (``secagg-commit-mismatch``). For every
    ``secagg-release`` a member logged towards an aggregator whose log is given, the
    aggregator's log must hold a commit of that round with that digest, and only one
    commit per round (``secagg-equivocation``).
    """
    out: list[Discrepancy] = []
    commits: dict[tuple[str, int], set[str]] = defaultdict(set)
    for agg, entries in logs.items():
        received = {
            (str(e.get("peer")), int(e["round"])): e
            for e in entries
            if e.get("direction") == "received" and e.get("kind") == "secagg-masked"
        }
        for c in _local(entries, COMMIT_KIND):
            rnd = int(c["round"])
            fields = read_reason(c)
            if fields is None:
                out.append(Discrepancy("secagg-unreadable", agg, "", COMMIT_KIND, rnd, c["seq"], None,
                                       "the commit's reason is not JSON"))
                continue
            commits[(agg, rnd)].add(str(c.get("payload_digest")))
            survivors, dropped = set(fields.get("survivors", [])), set(fields.get("dropped", []))
            got = {p for (p, r) in received if r == rnd}
            for p in sorted(got - survivors):
                out.append(Discrepancy(
                    "secagg-commit-mismatch", agg, p, COMMIT_KIND, rnd, c["seq"], received[(p, rnd)]["seq"],
                    f"the aggregator recorded receiving {p}'s masked vector, then committed it as "
                    f"{'dropped' if p in dropped else 'not a member'}"))
            for p in sorted(survivors - got):
                out.append(Discrepancy(
                    "secagg-commit-mismatch", agg, p, COMMIT_KIND, rnd, c["seq"], None,
                    f"committed {p} as a survivor without recording its masked vector as received"))
    for (agg, rnd), digests in sorted(commits.items()):
        if len(digests) > 1:
            out.append(Discrepancy("secagg-equivocation", agg, "", COMMIT_KIND, rnd, None, None,
                                   f"{len(digests)} different commits logged for one round"))
    for member, entries in logs.items():
        for rel in _local(entries, RELEASE_KIND):
            agg, rnd = str(rel.get("peer")), int(rel["round"])
            if agg not in logs:
                continue
            if str(rel.get("payload_digest")) not in commits.get((agg, rnd), set()):
                out.append(Discrepancy(
                    "secagg-equivocation", agg, member, RELEASE_KIND, rnd, None, rel["seq"],
                    f"{member} released against commit {rel.get('payload_digest')}, which the aggregator's "
                    "log does not hold for that round"))
    return out
