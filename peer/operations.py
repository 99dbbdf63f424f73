"""The operator's actions on a running peer: :class:`PeerOperations` implements :class:`Operator`.

The control API and the dashboard call these on the daemon's trio loop. They read the
store and the round context; the only things they change are the store (neighbour
selection, model names, imports, datasets), the consent decisions, and, for an imported
model before the first round, the learner's weights.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

from silomesh.audit import COLUMNS, AuditError, LoadedLog, verify_log
from silomesh.peer import privacy
from silomesh.peer.announces import announce_new_data
from silomesh.peer.config import PeerConfig
from silomesh.peer.context import RoundContext
from silomesh.peer.identity import PeerIdentity
from silomesh.peer.operator import OperatorError
from silomesh.peer.rounds import MAX_FAILED_ROUNDS
from silomesh.peer.store import ModelRecord, StoreError, write_atomic
from silomesh.protocol import state_digest

log = logging.getLogger(__name__)

#: phases in which an imported model replaces the learner's weights at once
IDLE_PHASES = ("starting", "waiting-approval", "idle")


def _model_dict(m: ModelRecord) -> dict[str, Any]:
    return {
        "digest": m.digest,
        "round": m.round,
        "name": m.name,
        "parent": m.parent,
        "created_at": m.created_at,
        "origin": m.origin,
    }


class PeerOperations:
    """What the operator may do with a running peer (see :class:`~silomesh.peer.operator.Operator`)."""

    def __init__(self, config: PeerConfig, identity: PeerIdentity, ctx: RoundContext) -> None:
        self.config = config
        self.identity = identity
        self.ctx = ctx
        self.store = ctx.store
        self.started_at = time.time()

    async def status(self) -> dict[str, Any]:
        last = self.store.latest_model()
        progress = self.ctx.progress
        strangers = self.store.stranger_totals()
        failed = self.store.failed_rounds_in_a_row()
        network = self.ctx.transport.network_status()
        return {
            "peer_id": self.ctx.peer_id,
            "federation": self.config.federation,
            "task": self.config.task.name,
            "strategy": self.config.strategy.name,
            "participation": self.config.participation,
            "round": progress.round,
            "phase": progress.phase,
            "addresses": self.ctx.transport.addrs,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "model": last.digest if last else None,
            "samples": self.ctx.learner.n_samples,
            "neighbours_connected": len(self.ctx.transport.connected),
            "neighbours_trusted": len(self.ctx.trust),
            # connections from PeerIDs outside the trust list: refused since start (live), and
            # over the store's life (written every few seconds; docs/PEER.md, "Strangers")
            "connections_refused": self.ctx.transport.statistics().refused_connections,
            "strangers_refused": strangers.refused,
            "stranger_peer_ids": strangers.peers,
            "strangers_last_at": strangers.last_at,
            # rounds rolled back since the last commit (docs/PEER.md, "What a neighbour's update may do")
            "failed_rounds_in_a_row": failed,
            "health": "stopped" if progress.phase == "stopped" else "degraded" if failed >= MAX_FAILED_ROUNDS else "ok",
            # can neighbours dial us (AutoNAT), and our relay reservations (docs/PEER.md section 5)
            "reachability": network["reachability"],
            "relay": network["relay"],
            # transfers cut off by a broken link and resumed (PROTOCOL.md 4.1; docs/PEER.md section 5)
            "transfers": {
                **self.ctx.endpoint.transfers.stats.as_dict(),
                "partial_bytes_held": self.ctx.endpoint.transfers.held_bytes,
            },
            # DP-SGD budget (docs/PRIVACY.md); None when the peer trains without [privacy]
            "privacy": privacy.budget_status(self.ctx.learner.dp, progress.phase == privacy.PHASE_EXHAUSTED),
            # the study manifest and whether our operator approved it (docs/PRIVACY.md); None without [study]
            "study": None if self.ctx.endpoint.study is None else self.ctx.endpoint.study.summary(),
        }

    async def neighbours(self) -> list[dict[str, Any]]:
        links = {str(x["peer_id"]): x for x in self.ctx.transport.network_status()["links"]}
        out = []
        for row in self.store.neighbours():
            if row["peer_id"] not in self.ctx.trust:
                continue
            row["connected"] = row["peer_id"] in self.ctx.transport.connected
            row["selected"] = bool(row.get("selected", 1))
            link = links.get(row["peer_id"], {})
            # how it is reached: direct, relayed, or upgraded (direct after relayed, DCUtR)
            row["connection"] = link.get("kind")
            row["rtt_ms"] = link.get("rtt_ms")
            row["reconnects"] = link.get("reconnects", 0)
            row["dial_failures"] = link.get("dial_failures", 0)
            row["failures_in_a_row"] = link.get("failures_in_a_row", 0)
            row["last_dial_error"] = link.get("last_error")
            out.append(row)
        return out

    async def select_neighbours(self, peer_ids: list[str]) -> list[dict[str, Any]]:
        unknown = [p for p in peer_ids if p not in self.ctx.trust]
        if unknown:
            raise OperatorError(f"not a trusted peer: {unknown[0]}", 404)
        with self.store.atomic():
            for p in self.ctx.trust:
                self.store.upsert_neighbour(p, selected=int(p in peer_ids))
        return await self.neighbours()

    async def rounds(self) -> list[dict[str, Any]]:
        metrics: dict[int, dict[str, float]] = {}
        for m in self.store.metrics():
            metrics.setdefault(m["round"], {})[m["name"]] = m["value"]
        # the round row does not carry bytes received; the signed audit log records every message's size
        received = self.store.received_bytes_by_round()
        return [
            {
                **r,
                "metrics": metrics.get(r["round"], {}),
                "bytes_received": received.get(r["round"], 0)
                if r.get("bytes_received") is None
                else r["bytes_received"],
            }
            for r in self.store.rounds()
        ]

    async def models(self) -> list[dict[str, Any]]:
        return [_model_dict(m) for m in self.store.models()]

    async def rename_model(self, ref: str, name: str) -> dict[str, Any]:
        try:
            self.store.rename_model(ref, name)
            return _model_dict(self.store.model(name))
        except StoreError as exc:
            raise OperatorError(str(exc), 404 if "no model" in str(exc) else 409) from None

    async def delete_model(self, ref: str) -> dict[str, Any]:
        try:
            m = self.store.delete_model(ref)
        except StoreError as exc:
            raise OperatorError(str(exc), 404) from None
        return {"digest": m.digest, "round": m.round, "deleted": True}

    async def export_model(self, ref: str, fmt: str) -> Path:
        try:
            m = self.store.model(ref)
        except StoreError as exc:
            raise OperatorError(str(exc), 404) from None
        if fmt == "safetensors":
            return m.file
        if fmt != "pt":
            raise OperatorError(f"unknown export format {fmt!r}; use pt or safetensors")
        import torch

        exports = self.config.data_dir / "exports"
        exports.mkdir(exist_ok=True)
        out = exports / f"{m.digest}.pt"
        state = {k: torch.from_numpy(np.array(v)) for k, v in self.store.load_model(m.digest).items()}
        write_atomic(out, lambda p: torch.save(state, p))
        return out

    async def import_model(self, data: bytes, filename: str) -> dict[str, Any]:
        from safetensors import SafetensorError
        from safetensors.numpy import load as load_safetensors

        try:
            state = load_safetensors(data)
        except (SafetensorError, ValueError, Exception) as exc:  # noqa: BLE001 - any parse failure
            raise OperatorError(f"{filename}: not a safetensors file ({exc})") from None
        learner = self.ctx.learner
        shapes = learner.shapes
        reference = learner.state()
        if set(state) != set(shapes):
            missing = sorted(set(shapes) - set(state))
            extra = sorted(set(state) - set(shapes))
            raise OperatorError(
                f"{filename}: tensors do not match the {self.config.task.name} model "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for k, v in state.items():
            if tuple(v.shape) != shapes[k]:
                raise OperatorError(f"{filename}: {k} has shape {tuple(v.shape)}, expected {shapes[k]}")
            if v.dtype != reference[k].dtype:
                raise OperatorError(f"{filename}: {k} is {v.dtype}, expected {reference[k].dtype}")
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise OperatorError(f"{filename}: {k} holds NaN or infinite values")
        digest = state_digest(state).hex()
        progress = self.ctx.progress
        self.store.save_model(state, digest, round=max(progress.round, -1), name=None, origin=f"import:{filename}")
        if progress.round < 0 or progress.phase in IDLE_PHASES:
            learner.load(state)
        return _model_dict(self.store.model(digest))

    async def datasets(self) -> list[dict[str, Any]]:
        return self.store.datasets()

    async def register_dataset(self, path: str) -> dict[str, Any]:
        from silomesh.models.data_io import DatasetError, folder_manifest

        try:
            manifest = await trio.to_thread.run_sync(
                functools.partial(folder_manifest, path, preprocess=self.config.task.preprocess)
            )
        except (DatasetError, OSError) as exc:
            raise OperatorError(str(exc)) from None
        info = manifest.to_dict()
        dataset_id = self.store.register_dataset(str(path), info)
        await announce_new_data(self.ctx.endpoint, info["count"], bytes.fromhex(info["digest"]))
        return {"id": dataset_id, "path": str(path), "manifest": info}

    async def approvals(self) -> list[dict[str, Any]]:
        return self.ctx.consent.list()

    async def decide(self, approval_id: int, approve: bool) -> dict[str, Any]:
        return self.ctx.consent.decide(approval_id, approve)

    async def approve_study(self, digest: str) -> dict[str, Any]:
        gate = self.ctx.endpoint.study
        if gate is None:
            raise OperatorError("this peer takes part in no study: its peer.toml has no [study] manifest", 404)
        return gate.approve(digest)

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        if limit < 1:
            raise OperatorError("limit must be a positive number of entries")
        rows = self.store.latest_audit_entries(limit)
        return [{k: v for k, v in r.items() if k not in ("envelope_header",)} for r in rows]

    async def verify_audit(self) -> dict[str, Any]:
        audit_log = self.ctx.endpoint.journal.audit_log
        # read on the loop (the store's connection is bound to this thread), check in a worker
        entries = [{c: e.get(c) for c in COLUMNS} for e in audit_log.entries()]
        public_key = bytes(self.identity.signing_key.verify_key)
        loaded = LoadedLog(str(self.config.store), entries, audit_log.heads(), self.ctx.peer_id, public_key)
        try:
            report = await trio.to_thread.run_sync(lambda: verify_log(loaded))
        except AuditError as exc:
            raise OperatorError(str(exc)) from None
        return {**report.to_json(), "summary": report.summary()}
