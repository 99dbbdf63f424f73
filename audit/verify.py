"""What an auditor does with one audit log: verify it.

:func:`verify_log` checks the whole hash chain, every entry's signature by the writer,
every recorded envelope signature by its sender (an entry that records an envelope must
carry its signed header), and every signed tree head; it says which entry was modified,
deleted, inserted, reordered or cut off rather than only that the chain breaks somewhere.
:func:`verify_chain` is the strict row-by-row check of the chain and entry signatures
alone. (:mod:`silomesh.audit.proofs` makes and checks RFC 6962 proofs;
:mod:`silomesh.audit.reconcile` matches peers' logs against each other.) The procedures
are specified in docs/AUDIT.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import nacl.exceptions
import nacl.signing

from silomesh.audit.entries import (
    DIRECTIONS,
    FIELDS,
    GENESIS,
    AuditError,
    TreeHead,
    entry_hash,
    hex_bytes,
    key_of,
    parse_envelope_header,
    prefix_roots,
    verify_ed25519,
)
from silomesh.audit.logfile import LoadedLog, writer_key
from silomesh.protocol.envelope import ENVELOPE_SIGNING_DOMAIN
from silomesh.protocol.peerid import PeerIdError, peer_id_from_public_key


@dataclass(frozen=True)
class ChainProblem:
    """One thing wrong with a log, located by entry number (``seq``) or row position."""

    position: int
    seq: int | None
    problem: str


def verify_chain(entries: Iterable[Mapping[str, Any]], public_key: bytes) -> list[ChainProblem]:
    """Check sequence numbers, the hash chain and every entry's signature (strictly, row by row).

    Returns an empty list when the log is intact. :func:`verify_log` adds envelope
    signatures, checkpoints and a diagnosis of what was changed.
    """
    verify_key = nacl.signing.VerifyKey(public_key)
    problems: list[ChainProblem] = []
    prev = GENESIS
    for position, entry in enumerate(entries, start=1):
        seq = entry.get("seq")
        if seq != position:
            problems.append(ChainProblem(position, seq, f"expected entry {position}, found {seq}"))
        if entry.get("prev_hash") != prev:
            problems.append(ChainProblem(position, seq, "previous-hash link broken"))
        try:
            computed = entry_hash(entry)
        except (KeyError, TypeError) as exc:
            problems.append(ChainProblem(position, seq, f"malformed entry: {exc}"))
            prev = str(entry.get("entry_hash", ""))
            continue
        if computed != entry.get("entry_hash"):
            problems.append(ChainProblem(position, seq, "content does not match its hash"))
        try:
            verify_key.verify(
                bytes.fromhex(str(entry.get("entry_hash", ""))), bytes.fromhex(str(entry.get("signature", "")))
            )
        except (nacl.exceptions.BadSignatureError, ValueError):
            problems.append(ChainProblem(position, seq, "signature does not verify"))
        prev = str(entry.get("entry_hash", ""))
    return problems


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a log.

    Attributes:
        entry: The entry number (``seq``) concerned, or None for the log as a whole.
        code: modified | reordered | deleted | inserted | truncated | signature | link |
            envelope | header | checkpoint | key | malformed.
        message: What is wrong, in words.
    """

    entry: int | None
    code: str
    message: str


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_log`; ``ok`` when there is no finding."""

    source: str
    peer_id: str
    public_key: str
    entries: int
    checkpoints: int
    latest_checkpoint: int | None
    envelope_signatures_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        head = f", signed head covers {self.latest_checkpoint}" if self.latest_checkpoint is not None else ""
        envelopes = f"{self.envelope_signatures_checked} envelope signatures verified"
        if self.ok:
            return f"OK {self.source}: {self.entries} entries by {self.peer_id}, chain intact{head}; {envelopes}"
        return f"FAILED {self.source}: {len(self.findings)} problem(s) in {self.entries} entries by {self.peer_id}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def _original_seqs(entries: Sequence[Mapping[str, Any]], content_ok: Sequence[bool]) -> list[int | None]:
    """For each row, the entry number its content was signed under (following prev_hash links)."""
    by_hash = {str(e.get("entry_hash")): i for i, e in enumerate(entries)}
    memo: dict[int, int | None] = {}
    for start in range(len(entries)):
        stack = [start]
        while stack:
            i = stack[-1]
            if i in memo:
                stack.pop()
                continue
            if content_ok[i]:
                memo[i] = entries[i]["seq"]
                stack.pop()
                continue
            prev = entries[i].get("prev_hash")
            j = by_hash.get(str(prev))
            if prev == GENESIS or j is None or j in stack:
                memo[i] = 1 if prev == GENESIS else _nearby_seq(entries[i])
                stack.pop()
            elif j in memo:
                memo[i] = None if memo[j] is None else memo[j] + 1  # type: ignore[operator]
                stack.pop()
            else:
                stack.append(j)
    return [memo[i] for i in range(len(entries))]


def _nearby_seq(entry: Mapping[str, Any]) -> int | None:
    """The number near its own that an entry was signed under, when its predecessor is gone."""
    seq = entry.get("seq")
    if type(seq) is not int:
        return None
    for d in (1, -1, 2, -2, 3, -3):
        try:
            if seq + d > 0 and _hash_as(entry, seq + d) == entry.get("entry_hash"):
                return seq + d
        except (TypeError, ValueError):
            return None
    return None


def _ranges(numbers: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def _check_entries(entries: list[dict[str, Any]], key: bytes, findings: list[Finding]) -> int:
    """Per-entry content and signature checks, then sequence and link analysis.

    Returns the highest entry number the log still holds (as signed, after undoing moves).
    """
    well_formed: list[bool] = []
    for e in entries:
        ok = all(f in e for f in FIELDS) and type(e.get("seq")) is int and isinstance(e.get("entry_hash"), str)
        well_formed.append(ok)
        if not ok:
            findings.append(
                Finding(
                    e.get("seq") if type(e.get("seq")) is int else None,
                    "malformed",
                    "entry lacks fields or has fields of the wrong type",
                )
            )
    content_ok = []
    for e, ok in zip(entries, well_formed, strict=True):
        try:
            content_ok.append(ok and entry_hash(e) == e["entry_hash"])
        except (TypeError, ValueError):
            content_ok.append(False)
    original = _original_seqs(entries, content_ok)
    relocated: dict[int, int] = {}  # row index -> the entry number its content belongs to
    for i, e in enumerate(entries):
        j = original[i]
        if (
            well_formed[i]
            and not content_ok[i]
            and j is not None
            and j != e["seq"]
            and _hash_as(e, j) == e["entry_hash"]
        ):
            relocated[i] = j
    copies = _copies(entries, content_ok, relocated)
    for i, e in enumerate(entries):
        if not well_formed[i]:
            continue
        seq = e["seq"]
        if not content_ok[i]:
            if i in copies:
                j = relocated[i]
                findings.append(
                    Finding(
                        seq,
                        "inserted",
                        f"entry {seq} repeats the entry signed as number {j} (a genuine entry replayed: inserted)",
                    )
                )
            elif i in relocated:
                j = relocated[i]
                findings.append(
                    Finding(
                        seq, "reordered", f"entry {seq} holds the content signed as entry {j} (moved or renumbered)"
                    )
                )
            elif e.get("direction") not in DIRECTIONS:
                findings.append(Finding(seq, "modified", f"entry {seq} has an unknown direction {e['direction']!r}"))
            else:
                findings.append(Finding(seq, "modified", f"entry {seq} was modified: content does not match its hash"))
        if not verify_ed25519(key, hex_bytes(e["entry_hash"]), str(e.get("signature") or "")):
            findings.append(
                Finding(
                    seq,
                    "signature",
                    f"entry {seq}: signature does not verify with the writer's key (forged, inserted or re-signed)",
                )
            )
    seqs = [e["seq"] for e, ok in zip(entries, well_formed, strict=True) if ok]
    counts = Counter(seqs)
    for seq, n in sorted(counts.items()):
        if n > 1:
            findings.append(Finding(seq, "inserted", f"entry number {seq} appears {n} times (an entry was inserted)"))
    signed_as = {relocated.get(i, e["seq"]) for i, e in enumerate(entries) if well_formed[i]}
    if signed_as:
        for lo, hi in _ranges(sorted(set(range(1, max(signed_as) + 1)) - signed_as)):
            numbers = f"{lo}" if lo == hi else f"{lo}-{hi}"
            what = f"entry {numbers} is" if lo == hi else f"entries {numbers} are"
            if relocated:  # numbers as signed: the rows were renumbered
                what = (
                    f"the entry signed as number {numbers} is" if lo == hi else f"the entries signed as {numbers} are"
                )
            findings.append(Finding(lo, "deleted", f"{what} missing (deleted)"))
    highest = 0
    for s in seqs:
        if s < highest and counts[s] == 1:
            findings.append(Finding(s, "reordered", f"entry {s} appears after entry {highest} (entries reordered)"))
        highest = max(highest, s)
    flagged = {f.entry for f in findings}
    by_seq = {e["seq"]: (i, e) for i, e in enumerate(entries) if well_formed[i] and counts[e["seq"]] == 1}
    by_hash = {str(e.get("entry_hash")): i for i, e in enumerate(entries)}
    for seq, (i, e) in sorted(by_seq.items()):
        if not content_ok[i] or seq in flagged:
            continue
        prev = e["prev_hash"]
        if seq == 1:
            if prev != GENESIS:
                findings.append(Finding(1, "link", "entry 1 does not start the chain (its previous hash is not zero)"))
            continue
        if seq - 1 not in by_seq or seq - 1 in flagged:
            continue  # the predecessor is missing or already reported
        j = by_hash.get(str(prev))
        if prev == by_seq[seq - 1][1]["entry_hash"] or (j is not None and relocated.get(j) == seq - 1):
            continue
        findings.append(
            Finding(seq, "link", f"entry {seq} does not follow entry {seq - 1} (previous-hash link broken)")
        )
    return max(signed_as, default=0)


def _copies(entries: Sequence[Mapping[str, Any]], content_ok: Sequence[bool], relocated: Mapping[int, int]) -> set[int]:
    """Rows whose content was signed under a number another row already holds: replayed copies.

    The row stored under its own number keeps it; among rows moved away from their
    number, the first in stored order is the moved original, later ones are copies.
    """
    held = {int(e["seq"]) for i, e in enumerate(entries) if content_ok[i]}
    copies: set[int] = set()
    for i in sorted(relocated):
        if relocated[i] in held:
            copies.add(i)
        held.add(relocated[i])
    return copies


def _hash_as(entry: Mapping[str, Any], seq: int) -> str:
    return entry_hash({**entry, "seq": seq})


def _missing_envelope(e: Mapping[str, Any]) -> Finding | None:
    """The rule of what carries an envelope: sent and received entries always record one
    (its signature and signed header); a refused entry records both or neither; a local
    entry (the peer's own act, e.g. its privacy spending) records neither."""
    seq, direction = e["seq"], e.get("direction")
    missing = [
        name
        for name, value in (
            ("envelope signature", e.get("envelope_sig")),
            ("envelope header", e.get("envelope_header")),
        )
        if not value
    ]
    if direction in ("sent", "received") and missing:
        return Finding(
            seq,
            "header",
            f"entry {seq}: a {direction} entry must record its envelope's signature and signed header; "
            f"it has no {' and no '.join(missing)} (forged or stripped)",
        )
    if direction == "local" and len(missing) < 2:
        return Finding(seq, "header", f"entry {seq}: a local entry records no envelope, but this one has one")
    if direction == "refused" and len(missing) == 1:
        return Finding(
            seq,
            "header",
            f"entry {seq}: a refused entry records its envelope's signature and signed header together or "
            f"neither; it has no {missing[0]}",
        )
    return None


def _check_envelope(e: Mapping[str, Any], writer: bytes, report: VerifyReport) -> Finding | None:
    seq = e["seq"]
    missing = _missing_envelope(e)
    if missing is not None or not e.get("envelope_sig"):
        return missing
    header = parse_envelope_header(str(e["envelope_header"]))
    if header is None:
        return Finding(seq, "envelope", f"entry {seq}: the recorded envelope header is malformed")
    other = key_of(str(e.get("peer")))
    if other is None:
        return Finding(seq, "envelope", f"entry {seq}: peer {e.get('peer')!r} is not an Ed25519 PeerID")
    sender, recipient = (writer, other) if e["direction"] == "sent" else (other, writer)
    who = "this peer" if e["direction"] == "sent" else str(e.get("peer"))
    if header.sender != sender or header.recipient != recipient:
        return Finding(seq, "envelope", f"entry {seq}: the envelope header names another sender or recipient")
    mismatch = [
        name
        for name, signed, recorded in (
            ("kind", header.kind.value, e.get("kind")),
            ("round", header.round, e.get("round")),
            ("payload digest", header.payload_digest.hex(), e.get("payload_digest")),
        )
        if signed != recorded
    ]
    if mismatch:
        return Finding(seq, "envelope", f"entry {seq}: {', '.join(mismatch)} differ(s) from the sender-signed header")
    report.envelope_signatures_checked += 1
    if not verify_ed25519(sender, ENVELOPE_SIGNING_DOMAIN + hex_bytes(e["envelope_header"]), str(e["envelope_sig"])):
        return Finding(seq, "envelope", f"entry {seq}: envelope signature does not verify with the key of {who}")
    return None


def _check_heads(
    log: LoadedLog, key: bytes, heads: Sequence[TreeHead], last: int, external: bool, findings: list[Finding]
) -> None:
    what = "given head" if external else "checkpoint"
    roots = prefix_roots(log.entries, [h.size for h in heads if h.size <= last])
    for head in heads:
        if not head.verify(key):
            findings.append(Finding(None, "checkpoint", f"{what} of size {head.size}: signature does not verify"))
            continue
        if head.size > last:
            findings.append(
                Finding(
                    last + 1,
                    "truncated",
                    f"log truncated: the {what} signed at {head.at_ms} ms covers "
                    f"{head.size} entries but the log ends at entry {last} (entries {last + 1}-{head.size} gone)",
                )
            )
            continue
        root = roots[head.size]
        if root is None:
            findings.append(
                Finding(
                    None, "checkpoint", f"{what} of size {head.size}: entries 1-{head.size} are not all there, in order"
                )
            )
        elif root != head.root_hash:
            findings.append(
                Finding(
                    None,
                    "checkpoint",
                    f"{what} of size {head.size}: entries 1-{head.size} do not match its signed root hash",
                )
            )


def verify_log(log: LoadedLog, *, key: bytes | None = None, heads: Sequence[TreeHead] = ()) -> VerifyReport:
    """Verify a whole log: chain, signatures, envelope signatures, checkpoints and ``heads``.

    Args:
        log: The log read by :func:`~silomesh.audit.logfile.load_log`.
        key: The writer's public key the auditor expects; by default the one the log records.
        heads: Signed tree heads the auditor kept from earlier (truncation evidence).

    Raises:
        AuditError: if the writer cannot be determined (no record in the log and no ``key``).
    """
    recorded = writer_key(log)
    use = key if key is not None else recorded
    if use is None:
        raise AuditError(f"{log.source} does not record who wrote it; give the writer's key (--key)")
    try:
        peer_id = peer_id_from_public_key(use)
    except PeerIdError:
        raise AuditError(f"{use.hex()} is not an Ed25519 public key") from None
    latest = max((h.size for h in log.checkpoints), default=None)
    report = VerifyReport(log.source, peer_id, use.hex(), len(log.entries), len(log.checkpoints), latest)
    findings = report.findings
    if key is not None and recorded is not None and key != recorded:
        findings.append(Finding(None, "key", f"the log says it was written by {recorded.hex()}, not by the given key"))
    if log.writer_public_key and log.writer_peer_id and key_of(log.writer_peer_id) != log.writer_public_key:
        findings.append(Finding(None, "key", "the recorded writer's PeerID and public key do not match"))
    for head in log.checkpoints:
        if head.peer_id != peer_id:
            findings.append(Finding(None, "key", f"checkpoint of size {head.size} names another writer {head.peer_id}"))
    last = _check_entries(log.entries, use, findings)
    for e in log.entries:
        if type(e.get("seq")) is int and all(f in e for f in FIELDS):
            found = _check_envelope(e, use, report)
            if found is not None:
                findings.append(found)
    _check_heads(log, use, log.checkpoints, last, False, findings)
    _check_heads(log, use, heads, last, True, findings)
    findings.sort(key=lambda f: (f.entry is None, f.entry or 0))
    return report
