"""The peer daemon: one hospital's long-running participant in a federation.

:class:`Peer` owns the store, the audit log, the libp2p mesh, the learner and the
round loop, and implements :class:`~silomesh.peer.operator.Operator` for the control
API. ``await nursery.start(peer.run)`` starts it; cancelling the scope stops it after a
clean shutdown (leave topics, disconnect, close the store).

Rounds are decentralised (see :mod:`silomesh.peer.rounds`): each peer trains, pushes
its update to the neighbours selected for the round and waits for theirs until the
round deadline; neighbours that do not answer in time are skipped for that round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

if TYPE_CHECKING:  # trio-typing's stubs, when installed, shadow trio's own TaskStatus
    from trio_typing import TaskStatus

from silomesh.models.registry import get_task
from silomesh.models.task import Silo
from silomesh.peer.audit import AuditLog
from silomesh.peer.config import PeerConfig
from silomesh.peer.exchange import AuditRecord
from silomesh.peer.faults import FaultHooks, NoFaults
from silomesh.peer.identity import PeerIdentity, load_key_file, public_key_from_peer_id
from silomesh.peer.learner import Learner, federation_seed, synthetic_silo
from silomesh.peer.mesh import Mesh, open_mesh
from silomesh.peer.operator import OperatorError
from silomesh.peer.store import Store, StoreError
from silomesh.protocol import DEFAULT_LIMITS, Identity, ReplayGuard, state_digest
from silomesh.strategies import get_strategy

log = logging.getLogger(__name__)


@dataclass
class Inbox:
    """Neighbours' latest full models, as reconstructed from their updates."""

    latest: dict[str, tuple[int, dict[str, np.ndarray], int, dict[str, float]]] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    def put(
        self, peer: str, round: int, state: dict[str, np.ndarray], n_samples: int, metrics: dict[str, float]
    ) -> None:
        old = self.latest.get(peer)
        if old is None or round >= old[0]:
            self.latest[peer] = (round, state, n_samples, metrics)
        self.changed.set()
        self.changed = trio.Event()

    def ready(self, peers: set[str], round: int) -> set[str]:
        return {p for p in peers if p in self.latest and self.latest[p][0] >= round}


class Consent:
    """Operator decisions for policy ``manual``, persisted in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._events: dict[int, trio.Event] = {}
        # a previous run's pending requests can no longer be answered: nobody waits for them
        store.db.execute(
            "UPDATE approvals SET status = 'expired', decided_at = ? WHERE status = 'pending'", [time.time()]
        )

    async def wait(self, kind: str, round: int, peer: str = "", detail: str = "") -> bool:
        db = self.store.db
        # db.table("approvals") is a new Table object on every access: take last_pk from insert's
        approvals = db.table("approvals").insert(
            {
                "kind": kind,
                "round": round,
                "peer": peer,
                "detail": detail,
                "status": "pending",
                "created_at": time.time(),
            }
        )
        approval_id = int(approvals.last_pk)
        event = self._events.setdefault(approval_id, trio.Event())
        log.info("waiting for operator approval #%d: %s round %d %s", approval_id, kind, round, peer)
        try:
            await event.wait()
        finally:  # cancelled (deadline, shutdown): the request can no longer be approved
            self._events.pop(approval_id, None)
            if db.table("approvals").get(approval_id)["status"] == "pending":
                db.table("approvals").update(approval_id, {"status": "expired", "decided_at": time.time()})
        return bool(db.table("approvals").get(approval_id)["status"] == "approved")

    def decide(self, approval_id: int, approve: bool) -> dict[str, Any]:
        db = self.store.db
        try:
            row = db.table("approvals").get(approval_id)
        except Exception:  # noqa: BLE001 - sqlite-utils raises NotFoundError
            raise OperatorError(f"no approval #{approval_id}", 404) from None
        if row["status"] != "pending":
            raise OperatorError(f"approval #{approval_id} was already {row['status']}", 409)
        db.table("approvals").update(
            approval_id, {"status": "approved" if approve else "declined", "decided_at": time.time()}
        )
        event = self._events.pop(approval_id, None)
        if event is not None:
            event.set()
        return dict(db.table("approvals").get(approval_id))

    def list(self) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM approvals ORDER BY id"))


#: ``[task.options]`` keys that pick this peer's synthetic silo rather than configure the task
SILO_OPTIONS = ("silos", "silo", "seed")


def load_silo(config: PeerConfig) -> Silo:
    """This peer's data: a registered folder, or a seeded synthetic silo (simnet, demos).

    Synthetic data is chosen with ``[task.options]``: ``silos`` (federation size),
    ``silo`` (this peer's index), ``seed``, plus the task's own options.

    Raises:
        OperatorError: if the data cannot be loaded.
    """
    options = dict(config.task.options)
    if config.task.dataset is not None:
        from silomesh.models.data_io import DatasetError, load_folder

        try:
            data = load_folder(config.task.dataset)
        except DatasetError as exc:
            raise OperatorError(str(exc)) from None
        n_test = max(1, len(data) // 5)
        order = np.random.default_rng(0).permutation(len(data))
        return Silo(config.task.dataset.name, data.subset(order[n_test:]), data.subset(order[:n_test]))
    n_silos = int(options.pop("silos", 1))
    index = int(options.pop("silo", 0))
    seed = int(options.pop("seed", 0))
    return synthetic_silo(config.task.name, n_silos, index, seed, **options)


class Peer:
    """A running silomesh peer (see module docstring)."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        identity: PeerIdentity | None = None,
        silo: Silo | None = None,
        faults: FaultHooks | None = None,
        serve_control_api: bool = True,
    ) -> None:
        self.config = config
        self.identity = identity or load_key_file(config.key_file)
        self.crypto = Identity.from_seed(self.identity.seed)
        self.peer_id = self.identity.peer_id_text
        task_options = {k: v for k, v in config.task.options.items() if k not in SILO_OPTIONS}
        try:
            self.task = get_task(config.task.name, **task_options)
        except (ValueError, TypeError) as exc:
            raise OperatorError(f"task: {exc}") from None
        try:
            self.strategy = get_strategy(config.strategy.name, config.strategy.params)
        except ValueError as exc:
            raise OperatorError(f"strategy: {exc}") from None
        self._silo = silo
        self.trusted = {t.peer_id: t for t in config.trusted}
        self.trusted_keys = {t.public_key: t.peer_id for t in config.trusted}
        self.replay = ReplayGuard()
        self.limits = DEFAULT_LIMITS
        self.inbox = Inbox()
        self.faults = faults or NoFaults()
        self.serve_control_api = serve_control_api
        self.round = -1
        self.phase = "starting"
        self.started_at = time.time()
        self.done = trio.Event()
        self.compute = trio.CapacityLimiter(1)
        self.acked: dict[str, tuple[bytes, dict[str, np.ndarray]]] = {}
        self.received: dict[str, tuple[bytes, dict[str, np.ndarray]]] = {}
        self.unreachable: set[str] = set()
        self.digest_memo: tuple[dict[str, np.ndarray], bytes] | None = None
        self._sequence = 0
        self.store: Store
        self.audit_log: AuditLog
        self.mesh: Mesh
        self.learner: Learner
        self.consent: Consent
        self.control_port: int | None = None

    # -- helpers --------------------------------------------------------------------

    def next_sequence(self) -> int:
        """Strictly increasing across restarts (microsecond clock, never repeating)."""
        self._sequence = max(self._sequence + 1, time.time_ns() // 1000)
        return self._sequence

    def public_key_of(self, peer_id: str) -> bytes:
        return public_key_from_peer_id(peer_id)

    def record(self, rec: AuditRecord) -> None:
        """Audit sink for the exchange layer; refusals also count toward distrust."""
        self.audit_log.append(
            rec.direction,
            rec.peer,
            rec.kind,
            round=max(rec.round, -1),
            payload_digest=rec.payload_digest,
            size=rec.size,
            envelope_sig=rec.envelope_sig,
            reason=rec.reason,
            envelope_header=rec.envelope_header,
        )
        if rec.direction == "refused":
            self.store.count_refused(rec.peer)

    def on_refused(self, peer: str, reason: str) -> None:
        self.audit_log.append("refused", peer, "connection", reason=reason)
        self.store.count_refused(peer)

    def selected_neighbours(self) -> list[str]:
        rows = {r["peer_id"]: r for r in self.store.neighbours()}
        return [p for p in self.trusted if rows.get(p, {}).get("selected", 1)]

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[Peer] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (or until ``rounds.count`` rounds are done)."""
        from silomesh.peer import handlers, rounds

        self.config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.store = Store(self.config.store)
        except StoreError as exc:
            raise OperatorError(str(exc)) from None
        self.audit_log = AuditLog(self.store, self.identity.signing_key)
        self.consent = Consent(self.store)
        silo = self._silo or await trio.to_thread.run_sync(load_silo, self.config)
        seed = federation_seed(self.config.federation)
        self.learner = await trio.to_thread.run_sync(
            lambda: Learner(
                self.task,
                silo,
                size=self.config.task.size,
                init_seed=seed,
                batch_size=self.config.rounds.batch_size,
                lr=self.config.rounds.lr,
                strategy=self.strategy,
            )
        )
        latest = self.store.latest_model()
        if latest is not None:
            self.learner.load(self.store.load_model(latest.digest))
            log.info("%s resumes from model %s of round %d", self.peer_id, latest.digest[:12], latest.round)
        for t in self.config.trusted:
            self.store.upsert_neighbour(t.peer_id, name=t.name, address=t.address)
        try:
            async with open_mesh(
                self.identity,
                self.config.listen,
                {t.peer_id: t.address for t in self.config.trusted},
                on_refused=self.on_refused,
            ) as mesh:
                self.mesh = mesh
                mesh.set_handler(lambda stream: handlers.serve_stream(self, stream))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(handlers.listen_announces, self)
                    if self.serve_control_api:
                        await self._start_control(nursery)
                    nursery.start_soon(rounds.connect_loop, self)
                    task_status.started(self)
                    await rounds.round_loop(self)
                    self.phase = "done"
                    self.done.set()
                    if self.config.rounds.count:
                        await self._linger()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                self.phase = "stopped"
                self.store.close()

    async def _linger(self) -> None:
        """After the last round, keep answering neighbours that are still finishing."""
        with trio.move_on_after(self.config.rounds.deadline_seconds):
            await trio.sleep_forever()

    async def _start_control(self, nursery: trio.Nursery) -> None:
        from silomesh.peer.control import TOKEN_FILE_NAME, serve_control

        try:
            self.control_port = await nursery.start(
                serve_control,
                self,
                self.config.control.host,
                self.config.control.port,
                self.config.data_dir / TOKEN_FILE_NAME,
            )
        except OSError as exc:
            log.error("control API not started: %s", exc)

    # -- Operator -------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        last = self.store.latest_model()
        return {
            "peer_id": self.peer_id,
            "federation": self.config.federation,
            "task": self.config.task.name,
            "strategy": self.config.strategy.name,
            "participation": self.config.participation,
            "round": self.round,
            "phase": self.phase,
            "addresses": self.mesh.addrs,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "model": last.digest if last else None,
            "samples": self.learner.n_samples,
            "neighbours_connected": len(self.mesh.connected),
            "neighbours_trusted": len(self.trusted),
            "health": "ok" if self.phase not in ("stopped",) else "stopped",
        }

    async def neighbours(self) -> list[dict[str, Any]]:
        out = []
        for row in self.store.neighbours():
            if row["peer_id"] not in self.trusted:
                continue
            row["connected"] = row["peer_id"] in self.mesh.connected
            row["selected"] = bool(row.get("selected", 1))
            out.append(row)
        return out

    async def select_neighbours(self, peer_ids: list[str]) -> list[dict[str, Any]]:
        unknown = [p for p in peer_ids if p not in self.trusted]
        if unknown:
            raise OperatorError(f"not a trusted peer: {unknown[0]}", 404)
        with self.store.atomic():
            for p in self.trusted:
                self.store.upsert_neighbour(p, selected=int(p in peer_ids))
        return await self.neighbours()

    async def rounds(self) -> list[dict[str, Any]]:
        metrics: dict[int, dict[str, float]] = {}
        for m in self.store.metrics():
            metrics.setdefault(m["round"], {})[m["name"]] = m["value"]
        # the round row does not carry bytes received; the signed audit log records every message's size
        received = {
            int(r["round"]): int(r["total"])
            for r in self.store.db.query(
                "SELECT round, sum(size) AS total FROM audit WHERE direction = 'received' GROUP BY round"
            )
        }
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
        return [
            {
                "digest": m.digest,
                "round": m.round,
                "name": m.name,
                "parent": m.parent,
                "created_at": m.created_at,
                "origin": m.origin,
            }
            for m in self.store.models()
        ]

    def _model_dict(self, ref: str) -> dict[str, Any]:
        m = self.store.model(ref)
        return {
            "digest": m.digest,
            "round": m.round,
            "name": m.name,
            "parent": m.parent,
            "created_at": m.created_at,
            "origin": m.origin,
        }

    async def rename_model(self, ref: str, name: str) -> dict[str, Any]:
        try:
            self.store.rename_model(ref, name)
            return self._model_dict(name)
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

        from silomesh.peer.store import write_atomic

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
        shapes = self.learner.shapes
        reference = self.learner.state()
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
        self.store.save_model(state, digest, round=max(self.round, -1), name=None, origin=f"import:{filename}")
        if self.round < 0 or self.phase in ("starting", "waiting-approval", "idle"):
            self.learner.load(state)
        return self._model_dict(digest)

    async def datasets(self) -> list[dict[str, Any]]:
        return self.store.datasets()

    async def register_dataset(self, path: str) -> dict[str, Any]:
        from silomesh.models.data_io import DatasetError, folder_manifest

        try:
            manifest = await trio.to_thread.run_sync(folder_manifest, path)
        except (DatasetError, OSError) as exc:
            raise OperatorError(str(exc)) from None
        info = manifest.to_dict()
        dataset_id = self.store.register_dataset(str(path), info)
        from silomesh.peer import handlers

        await handlers.announce_new_data(self, info["count"], bytes.fromhex(info["digest"]))
        return {"id": dataset_id, "path": str(path), "manifest": info}

    async def approvals(self) -> list[dict[str, Any]]:
        return self.consent.list()

    async def decide(self, approval_id: int, approve: bool) -> dict[str, Any]:
        return self.consent.decide(approval_id, approve)

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        if limit < 1:
            raise OperatorError("limit must be a positive number of entries")
        rows = self.store.db.query("SELECT * FROM audit ORDER BY seq DESC LIMIT ?", [limit])
        return [{k: v for k, v in r.items() if k not in ("envelope_header",)} for r in rows]

    async def verify_audit(self) -> dict[str, Any]:
        from silomesh.peer.audit import COLUMNS, AuditError, LoadedLog
        from silomesh.peer.audit_verify import verify_log

        # read on the loop (the store's connection is bound to this thread), check in a worker
        entries = [{c: e.get(c) for c in COLUMNS} for e in self.audit_log.entries()]
        public_key = bytes(self.identity.signing_key.verify_key)
        log_ = LoadedLog(str(self.config.store), entries, self.audit_log.heads(), self.peer_id, public_key)
        try:
            report = await trio.to_thread.run_sync(lambda: verify_log(log_))
        except AuditError as exc:
            raise OperatorError(str(exc)) from None
        return {**report.to_json(), "summary": report.summary()}
