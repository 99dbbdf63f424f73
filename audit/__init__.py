"""silomesh.audit: the auditor's tools for peers' signed exchange logs (offline, read-only).

Everything an auditor needs and nothing a peer runs: the entry format and signed tree
heads (:mod:`.entries`), reading a log from a store or an export (:mod:`.logfile`),
verification (:mod:`.verify`), inclusion and consistency proofs (:mod:`.proofs`),
reconciliation across peers (:mod:`.reconcile`) and the ``silomesh audit`` commands
(:mod:`.cli`, not imported here so the library loads no click or rich). It depends only
on :mod:`silomesh.protocol` — no torch, trio or libp2p (a test checks this). The writer,
``silomesh.peer.audit.AuditLog``, lives with the daemon. Specified in docs/AUDIT.md.
"""

from __future__ import annotations

from .entries import (
    CHECKPOINT_DOMAIN,
    COLUMNS,
    DIRECTIONS,
    DOMAIN,
    FIELDS,
    GENESIS,
    HEAD_FORMAT,
    WRITER_STATE_KEY,
    AuditError,
    TreeHead,
    entry_hash,
    entry_leaf,
    parse_envelope_header,
)
from .logfile import EXPORT_FORMAT, STORE_FILE_NAME, LoadedLog, export_csv, export_jsonl, load_log, writer_key
from .proofs import (
    CONSISTENCY_FORMAT,
    PROOF_FORMAT,
    check_consistency,
    check_inclusion,
    consistency,
    head_of,
    inclusion,
)
from .reconcile import Discrepancy, ReconcileReport, reconcile
from .verify import ChainProblem, Finding, VerifyReport, verify_chain, verify_log

__all__ = [
    "CHECKPOINT_DOMAIN",
    "COLUMNS",
    "CONSISTENCY_FORMAT",
    "DIRECTIONS",
    "DOMAIN",
    "EXPORT_FORMAT",
    "FIELDS",
    "GENESIS",
    "HEAD_FORMAT",
    "PROOF_FORMAT",
    "STORE_FILE_NAME",
    "WRITER_STATE_KEY",
    "AuditError",
    "ChainProblem",
    "Discrepancy",
    "Finding",
    "LoadedLog",
    "ReconcileReport",
    "TreeHead",
    "VerifyReport",
    "check_consistency",
    "check_inclusion",
    "consistency",
    "entry_hash",
    "entry_leaf",
    "export_csv",
    "export_jsonl",
    "head_of",
    "inclusion",
    "load_log",
    "parse_envelope_header",
    "reconcile",
    "verify_chain",
    "verify_log",
    "writer_key",
]
