"""Proofs about an audit log for a third party: inclusion of an entry, consistency of two heads.

:func:`inclusion` / :func:`check_inclusion` and :func:`consistency` /
:func:`check_consistency` make and check RFC 6962 proofs (:mod:`silomesh.protocol.merkle`)
against the writer's signed tree heads, so an auditor who kept a head can later be shown
that an entry is in the log, or that the log only grew. Specified in docs/AUDIT.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from silomesh.audit.entries import AuditError, TreeHead, entry_hash, entry_leaf, hex_bytes, prefix_roots, verify_ed25519
from silomesh.audit.logfile import LoadedLog
from silomesh.protocol.merkle import (
    consistency_proof,
    inclusion_proof,
    root_from_inclusion,
    tree_root,
    verify_consistency,
)

PROOF_FORMAT = "silomesh-inclusion-proof/1"
CONSISTENCY_FORMAT = "silomesh-consistency-proof/1"


def head_of(log: LoadedLog, size: int | None = None) -> TreeHead:
    """The signed checkpoint of ``size`` entries (the latest by default).

    Raises:
        AuditError: if the log has no such checkpoint.
    """
    if not log.checkpoints:
        raise AuditError(
            f"{log.source} has no signed checkpoint yet "
            "(a peer signs one at each round end, every 64 entries, every 60 s and when it stops)"
        )
    if size is None:
        return log.checkpoints[-1]
    for head in log.checkpoints:
        if head.size == size:
            return head
    sizes = ", ".join(str(h.size) for h in log.checkpoints)
    raise AuditError(f"{log.source} has no checkpoint of size {size}; checkpoints cover: {sizes}")


def _leaves(log: LoadedLog, size: int) -> list[bytes]:
    if prefix_roots(log.entries, [size])[size] is None:
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
        head.public_key if head.verify() else b"", hex_bytes(entry.get("entry_hash")), str(entry.get("signature") or "")
    ):
        problems.append("the entry's signature does not verify with the head's writer key")
    leaf = entry_leaf(entry) if hex_bytes(entry.get("entry_hash")) else b""
    if root_from_inclusion(leaf, index, size, path) != hex_bytes(head.root_hash):
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
    if not verify_consistency(a.size, b.size, hex_bytes(a.root_hash), hex_bytes(b.root_hash), path):
        problems.append(f"the head of size {b.size} does not extend the head of size {a.size}")
    return problems
