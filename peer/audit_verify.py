"""What an auditor does with one audit log: verify it, prove entries and heads.

:func:`verify_log` checks the whole hash chain, every entry's signature by the writer,
every recorded envelope signature by its sender, and every signed tree head; it says
which entry was modified, deleted, inserted, reordered or cut off rather than only that
the chain breaks somewhere. :func:`inclusion` / :func:`check_inclusion` and
:func:`consistency` / :func:`check_consistency` make and check RFC 6962 proofs against
signed heads. (:mod:`silomesh.peer.audit_reconcile` matches peers' logs against each
other.) The procedures are specified in docs/AUDIT.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from silomesh.peer.audit import (
    DIRECTIONS,
    FIELDS,
    GENESIS,
    AuditError,
    LoadedLog,
    TreeHead,
    entry_hash,
    entry_leaf,
    verify_ed25519,
    writer_key,
)
from silomesh.peer.identity import IdentityError, peer_id_from_public_key, public_key_from_peer_id
from silomesh.protocol import ProtocolError
from silomesh.protocol.envelope import ENVELOPE_SIGNING_DOMAIN, EnvelopeHeader
from silomesh.protocol.limits import MAX_HEADER_SIZE
from silomesh.protocol.merkle import (
    Frontier,
    consistency_proof,
    inclusion_proof,
    root_from_inclusion,
    tree_root,
    verify_consistency,
)
from silomesh.protocol.wire import unpack_map

PROOF_FORMAT = "silomesh-inclusion-proof/1"
CONSISTENCY_FORMAT = "silomesh-consistency-proof/1"


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a log.

    Attributes:
        entry: The entry number (``seq``) concerned, or None for the log as a whole.
        code: modified | reordered | deleted | inserted | truncated | signature | link |
            envelope | checkpoint | key | malformed.
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
    envelope_signatures_unverifiable: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        head = f", signed head covers {self.latest_checkpoint}" if self.latest_checkpoint is not None else ""
        envelopes = f"{self.envelope_signatures_checked} envelope signatures verified"
        if self.envelope_signatures_unverifiable:
            envelopes += f" ({self.envelope_signatures_unverifiable} recorded without header, not checkable)"
        if self.ok:
            return f"OK {self.source}: {self.entries} entries by {self.peer_id}, chain intact{head}; {envelopes}"
        return f"FAILED {self.source}: {len(self.findings)} problem(s) in {self.entries} entries by {self.peer_id}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def parse_envelope_header(hex_header: str) -> EnvelopeHeader | None:
    try:
        return EnvelopeHeader(**unpack_map(bytes.fromhex(hex_header), what="header", max_size=MAX_HEADER_SIZE))
    except (ProtocolError, ValueError, TypeError):
        return None


def _key_of(peer_id: str) -> bytes | None:
    try:
        return public_key_from_peer_id(peer_id)
    except IdentityError:
        return None


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
        if not well_formed[i]:
            continue
        seq = e["seq"]
        if not content_ok[i]:
            j = original[i]
            if j is not None and j != seq and _hash_as(e, j) == e["entry_hash"]:
                relocated[i] = j
                findings.append(
                    Finding(
                        seq, "reordered", f"entry {seq} holds the content signed as entry {j} (moved or renumbered)"
                    )
                )
            elif e.get("direction") not in DIRECTIONS:
                findings.append(Finding(seq, "modified", f"entry {seq} has an unknown direction {e['direction']!r}"))
            else:
                findings.append(Finding(seq, "modified", f"entry {seq} was modified: content does not match its hash"))
        if not verify_ed25519(key, _hex(e["entry_hash"]), str(e.get("signature") or "")):
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


def _hex(value: Any) -> bytes:
    try:
        return bytes.fromhex(str(value))
    except ValueError:
        return b""


def _hash_as(entry: Mapping[str, Any], seq: int) -> str:
    return entry_hash({**entry, "seq": seq})


def _check_envelope(e: Mapping[str, Any], writer: bytes, report: VerifyReport) -> Finding | None:
    seq = e["seq"]
    if not e.get("envelope_sig"):
        return None
    if not e.get("envelope_header"):
        report.envelope_signatures_unverifiable += 1
        return None
    header = parse_envelope_header(str(e["envelope_header"]))
    if header is None:
        return Finding(seq, "envelope", f"entry {seq}: the recorded envelope header is malformed")
    other = _key_of(str(e.get("peer")))
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
    if not verify_ed25519(sender, ENVELOPE_SIGNING_DOMAIN + _hex(e["envelope_header"]), str(e["envelope_sig"])):
        return Finding(seq, "envelope", f"entry {seq}: envelope signature does not verify with the key of {who}")
    return None


def _prefix_roots(entries: Sequence[Mapping[str, Any]], sizes: Iterable[int]) -> dict[int, str | None]:
    """Hex root over entries 1..size for each size, in one pass; None where they are not all present in order."""
    wanted = sorted(set(sizes))
    roots: dict[int, str | None] = dict.fromkeys(wanted)
    frontier = Frontier()
    pending = iter(wanted)
    target = next(pending, None)
    while target is not None and target == 0:
        roots[0] = frontier.root.hex()
        target = next(pending, None)
    for position, e in enumerate(entries, start=1):
        if target is None or e.get("seq") != position:
            break
        try:
            frontier.append(entry_leaf(e))
        except (ValueError, KeyError):
            break
        while target is not None and target == position:
            roots[target] = frontier.root.hex()
            target = next(pending, None)
    return roots


def _root_of_prefix(entries: Sequence[Mapping[str, Any]], size: int) -> str | None:
    return _prefix_roots(entries, [size])[size]


def _check_heads(
    log: LoadedLog, key: bytes, heads: Sequence[TreeHead], last: int, external: bool, findings: list[Finding]
) -> None:
    what = "given head" if external else "checkpoint"
    roots = _prefix_roots(log.entries, [h.size for h in heads if h.size <= last])
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
        log: The log read by :func:`~silomesh.peer.audit.load_log`.
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
    except Exception:  # noqa: BLE001 - libp2p raises assorted errors for a bad key
        raise AuditError(f"{use.hex()} is not an Ed25519 public key") from None
    latest = max((h.size for h in log.checkpoints), default=None)
    report = VerifyReport(log.source, peer_id, use.hex(), len(log.entries), len(log.checkpoints), latest)
    findings = report.findings
    if key is not None and recorded is not None and key != recorded:
        findings.append(Finding(None, "key", f"the log says it was written by {recorded.hex()}, not by the given key"))
    if log.writer_public_key and log.writer_peer_id and _key_of(log.writer_peer_id) != log.writer_public_key:
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


# -- proofs ---------------------------------------------------------------------------


def head_of(log: LoadedLog, size: int | None = None) -> TreeHead:
    """The signed checkpoint of ``size`` entries (the latest by default).

    Raises:
        AuditError: if the log has no such checkpoint.
    """
    if not log.checkpoints:
        raise AuditError(f"{log.source} has no signed checkpoint yet (one is signed at each round end)")
    if size is None:
        return log.checkpoints[-1]
    for head in log.checkpoints:
        if head.size == size:
            return head
    sizes = ", ".join(str(h.size) for h in log.checkpoints)
    raise AuditError(f"{log.source} has no checkpoint of size {size}; checkpoints cover: {sizes}")


def _leaves(log: LoadedLog, size: int) -> list[bytes]:
    if _root_of_prefix(log.entries, size) is None:
        raise AuditError(f"entries 1-{size} of {log.source} are not all present; run 'silomesh audit verify'")
    return [entry_leaf(e) for e in log.entries[:size]]


def inclusion(log: LoadedLog, seq: int, size: int | None = None) -> dict[str, Any]:
    """An inclusion proof of entry ``seq`` under a signed head (JSON-ready).

    Raises:
        AuditError: if the entry or a head covering it does not exist.
    """
    head = head_of(log, size)
    if not 1 <= seq <= head.size:
        raise AuditError(f"entry {seq} is not covered by the signed head of size {head.size}")
    leaves = _leaves(log, head.size)
    if tree_root(leaves).hex() != head.root_hash:
        raise AuditError(f"{log.source} no longer matches its head of size {head.size}; run 'silomesh audit verify'")
    entry = log.entries[seq - 1]
    return {
        "format": PROOF_FORMAT,
        "entry": entry,
        "leaf_index": seq - 1,
        "tree_size": head.size,
        "leaf_hash": leaves[seq - 1].hex(),
        "audit_path": [p.hex() for p in inclusion_proof(leaves, seq - 1)],
        "head": head.to_json(),
    }


def check_inclusion(proof: Mapping[str, Any], head: TreeHead, key: bytes | None = None) -> list[str]:
    """Problems with an inclusion proof against a signed head you trust (empty when it holds)."""
    problems = []
    if key is not None and head.verify(key) is False:
        problems.append("the head is not signed by the given key")
    if not head.verify():
        problems.append(f"the head's signature does not verify with the key of {head.peer_id}")
    try:
        entry = dict(proof["entry"])
        index, size = int(proof["leaf_index"]), int(proof["tree_size"])
        path = [bytes.fromhex(p) for p in proof["audit_path"]]
    except (KeyError, TypeError, ValueError) as exc:
        return [*problems, f"malformed proof: {exc}"]
    if size != head.size:
        problems.append(f"the proof is for a tree of {size} entries, the head covers {head.size}")
    if entry.get("seq") != index + 1:
        problems.append(f"the entry is number {entry.get('seq')}, the proof is for leaf {index}")
    try:
        if entry_hash(entry) != entry.get("entry_hash"):
            problems.append("the entry's content does not match its hash")
    except (KeyError, TypeError):
        problems.append("the entry is malformed")
    if not verify_ed25519(
        head.public_key if head.verify() else b"", _hex(entry.get("entry_hash")), str(entry.get("signature") or "")
    ):
        problems.append("the entry's signature does not verify with the head's writer key")
    leaf = entry_leaf(entry) if _hex(entry.get("entry_hash")) else b""
    if root_from_inclusion(leaf, index, size, path) != _hex(head.root_hash):
        problems.append("the audit path does not lead to the head's root hash")
    return problems


def consistency(log: LoadedLog, first: int, second: int | None = None) -> dict[str, Any]:
    """A consistency proof between two signed heads of ``log`` (JSON-ready).

    Raises:
        AuditError: if either head does not exist or ``first`` > ``second``.
    """
    a, b = head_of(log, first), head_of(log, second)
    if a.size > b.size:
        raise AuditError(f"--from {a.size} is after --to {b.size}")
    leaves = _leaves(log, b.size)
    return {
        "format": CONSISTENCY_FORMAT,
        "first": a.to_json(),
        "second": b.to_json(),
        "proof": [p.hex() for p in consistency_proof(leaves, a.size)],
    }


def check_consistency(proof: Mapping[str, Any], key: bytes | None = None) -> list[str]:
    """Problems with a consistency proof (empty when both heads are signed and consistent)."""
    try:
        a, b = TreeHead.from_json(proof["first"]), TreeHead.from_json(proof["second"])
        path = [bytes.fromhex(p) for p in proof["proof"]]
    except (KeyError, TypeError, ValueError, AuditError) as exc:
        return [f"malformed proof: {exc}"]
    problems = []
    if a.peer_id != b.peer_id:
        problems.append("the two heads were signed by different peers")
    for name, head in (("first", a), ("second", b)):
        if not head.verify(key):
            problems.append(f"the {name} head's signature does not verify")
    if not verify_consistency(a.size, b.size, _hex(a.root_hash), _hex(b.root_hash), path):
        problems.append(f"the head of size {b.size} does not extend the head of size {a.size}")
    return problems
