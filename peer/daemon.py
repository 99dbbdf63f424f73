"""The peer daemon: one hospital's long-running participant in a federation, start to stop.

:class:`Peer` opens the store and the audit log, builds the learner and the round
context (:mod:`silomesh.peer.context`), opens the transport (libp2p by default), and
runs the stream handler, the announce listener, the connect loop, the control API and
the round loop in one nursery. ``await nursery.start(peer.run)`` starts it; cancelling
the scope stops it after a clean shutdown (leave topics, disconnect, sign the audit
log's tail, close the store).
What a round does is in :mod:`silomesh.peer.rounds`; what the operator can ask is in
:mod:`silomesh.peer.operations`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:  # trio-typing's stubs, when installed, shadow trio's own TaskStatus
    from trio_typing import TaskStatus

from silomesh.audit import secagg as secagg_audit
from silomesh.models.data_io import DatasetError
from silomesh.models.task import Silo
from silomesh.peer import announces, dialer, handlers, privacy, rounds
from silomesh.peer.audit import AuditLog, serve_checkpoints
from silomesh.peer.config import PeerConfig
from silomesh.peer.consent import Consent
from silomesh.peer.context import (
    Compute,
    Endpoint,
    Journal,
    Progress,
    RoundContext,
    SequenceCounter,
    ThreadCompute,
    Trust,
    hello_codecs,
)
from silomesh.peer.control import TOKEN_FILE_NAME, serve_control
from silomesh.peer.exchange import Timeouts
from silomesh.peer.faults import FaultHooks, NoFaults
from silomesh.peer.identity import PeerIdentity, load_key_file
from silomesh.peer.learner import Learner, build_task, check_keep_unlabelled, federation_seed, load_silo
from silomesh.peer.linklog import watch_links
from silomesh.peer.mesh import open_mesh
from silomesh.peer.operations import PeerOperations
from silomesh.peer.operator import OperatorError
from silomesh.peer.safety import state_violation
from silomesh.peer.secure_state import KEEP_ROUNDS
from silomesh.peer.store import PERSONAL, ModelRecord, Store, StoreError
from silomesh.peer.strangers import Strangers, serve_strangers
from silomesh.peer.study import StudyGate, load_study
from silomesh.peer.transfers import BufferBudget, Transfers
from silomesh.peer.transport import Transport, TransportFactory
from silomesh.protocol import DEFAULT_LIMITS, Identity, ReplayGuard
from silomesh.strategies import StateDict, Strategy, get_strategy

log = logging.getLogger(__name__)


def _silo(config: PeerConfig) -> Silo:
    try:
        return load_silo(config.task)
    except DatasetError as exc:
        raise OperatorError(str(exc)) from None


class Peer:
    """A running silomesh peer (see module docstring).

    Args:
        config: the validated peer.toml.
        identity: this peer's keys (default: read from ``config.key_file``).
        silo: this peer's data (default: the registered folder or synthetic silo of ``config``).
        faults: simnet's fault injection points (default: none).
        serve_control_api: start the loopback control API and dashboard.
        transport: opens the transport (default: libp2p, :func:`~silomesh.peer.mesh.open_mesh`).
        compute: where torch work runs (default: a worker thread under a limiter of one).

    Raises:
        OperatorError: if the task or strategy in ``config`` cannot be built.
    """

    def __init__(
        self,
        config: PeerConfig,
        *,
        identity: PeerIdentity | None = None,
        silo: Silo | None = None,
        faults: FaultHooks | None = None,
        serve_control_api: bool = True,
        transport: TransportFactory = open_mesh,
        compute: Compute | None = None,
    ) -> None:
        self.config = config
        self.identity = identity or load_key_file(config.key_file)
        self.peer_id = self.identity.peer_id_text
        try:
            self.task = build_task(config.task)
        except (ValueError, TypeError) as exc:
            raise OperatorError(f"task: {exc}") from None
        if config.rounds.keep_unlabelled:
            try:
                check_keep_unlabelled(self.task)
            except ValueError as exc:
                raise OperatorError(str(exc)) from None
        try:
            self.strategy: Strategy = get_strategy(config.strategy.name, config.strategy.params)
            problem = self.strategy.trust_problem(self.peer_id, {t.peer_id for t in config.trusted})
            if problem is not None:
                raise ValueError(problem)
        except ValueError as exc:
            raise OperatorError(f"strategy: {exc}") from None
        self.study = load_study(config, self.peer_id)  # OperatorError naming each field that differs
        self._silo = silo
        self._faults = faults or NoFaults()
        self._open_transport = transport
        self._compute = compute or ThreadCompute()
        self.serve_control_api = serve_control_api
        self.progress = Progress()
        self.done = trio.Event()
        self.control_port: int | None = None
        # set by run():
        self.store: Store
        self.audit_log: AuditLog
        self.learner: Learner
        self.context: RoundContext
        self.operator: PeerOperations

    @property
    def transport(self) -> Transport:
        """The open transport (while :meth:`run` serves)."""
        return self.context.transport

    @property
    def round(self) -> int:
        return self.progress.round

    @property
    def phase(self) -> str:
        return self.progress.phase

    async def run(self, *, task_status: TaskStatus[Peer] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (or until ``rounds.count`` rounds are done)."""
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.store = Store(config.store)
        except StoreError as exc:
            raise OperatorError(str(exc)) from None
        self.audit_log = AuditLog(self.store, self.identity.signing_key)
        try:
            await self._serve(task_status)
        finally:  # synchronous, so no cancellation can cut it short
            self.progress.phase = "stopped"
            try:
                self.audit_log.checkpoint()  # sign the tail: a clean stop leaves no audit entry unsigned
            finally:
                self.store.close()

    async def _serve(self, task_status: TaskStatus[Peer]) -> None:
        config, store = self.config, self.store
        silo = self._silo if self._silo is not None else await self._compute.run_blocking(_silo, config)
        try:  # a hospital's own network must fit its data and the task (docs/TASKS.md)
            await self._compute.run_blocking(self.task.check_data, silo.train)
        except ValueError as exc:
            raise OperatorError(str(exc)) from None
        seed = federation_seed(config.federation)
        spent = privacy.spent_history(self.audit_log.entries())  # a restart keeps the budget spent (SQLite: here)
        try:  # [privacy] refuses a model DP-SGD cannot protect (BatchNorm), naming the layer
            self.learner = await self._compute.run_blocking(
                lambda: Learner(
                    self.task,
                    silo,
                    size=config.task.size,
                    init_seed=seed,
                    batch_size=config.rounds.batch_size,
                    lr=config.rounds.lr,
                    strategy=self.strategy,
                    privacy=privacy.dp_settings(config.privacy),
                    spent_history=spent,
                    keep_unlabelled=config.rounds.keep_unlabelled,
                )
            )
        except ValueError as exc:
            raise OperatorError(str(exc)) from None
        resumed = _last_good_model(store)  # once at start, before serving; SQLite stays on this thread
        if resumed is not None:
            record, state = resumed
            self.learner.load(state)
            log.info("%s resumes from model %s of round %d", self.peer_id, record.digest[:12], record.round)
        for t in config.trusted:
            store.upsert_neighbour(t.peer_id, name=t.name, address=t.address)
        journal = Journal(self.audit_log, store, trusted=frozenset(t.peer_id for t in config.trusted))
        gate = None if self.study is None else StudyGate(self.study, self.audit_log)
        net = config.network
        strangers = Strangers(store, self.audit_log)  # the transport refuses only untrusted PeerIDs
        async with self._open_transport(
            self.identity,
            config.listen,
            {t.peer_id: t.address for t in config.trusted},
            on_refused=strangers.refused,
            relay=config.relay if config.relay.enabled else None,
            ping_interval=net.ping_interval_seconds,
        ) as transport:
            endpoint = Endpoint(
                crypto=Identity.from_seed(self.identity.seed),
                peer_id=self.peer_id,
                federation=config.federation,
                model_id=config.task.model_id,
                trust=Trust({t.peer_id: t for t in config.trusted}),
                replay=ReplayGuard(low_water_marks=store.replay_marks()),
                limits=DEFAULT_LIMITS,
                sequence=SequenceCounter(),
                journal=journal,
                transport=transport,
                progress=self.progress,
                timeouts=Timeouts(
                    net.hello_timeout_seconds, net.stall_timeout_seconds, net.idle_timeout_seconds,
                    net.reply_timeout_seconds,
                ),
                budget=(budget := BufferBudget.for_model(_model_bytes(self.learner.wire_shapes))),
                # partial frames kept to resume: as much as all neighbours' streams may buffer
                transfers=Transfers(max_bytes=budget.total),
                max_skew_ms=int(net.max_clock_skew_seconds * 1000) or None,
                stream_threshold=int(net.stream_threshold_mb * 1e6),
                codecs=hello_codecs(config.rounds.codec),
                round_window=net.round_window,
                expected_dtypes=self.learner.wire_dtypes(),
                study=gate,
            )
            ctx = self.context = RoundContext(
                endpoint=endpoint,
                rounds=config.rounds,
                participation=config.participation,
                learner=self.learner,
                store=store,
                consent=Consent(store),
                faults=self._faults,
                compute=self._compute,
                personal=config.personal,
            )
            # groups joined before a restart stay joined (their seeds are gone: refuse them again)
            since = (resumed[0].round if resumed is not None else 0) - max(KEEP_ROUNDS, net.round_window)
            ctx.secure.recall(store.local_audit_entries(secagg_audit.GROUP_KIND, since))
            self.operator = PeerOperations(config, self.identity, ctx)
            transport.set_handler(lambda stream: handlers.serve_stream(ctx, stream))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(announces.listen_announces, ctx)
                nursery.start_soon(serve_checkpoints, self.audit_log)  # no entry unsigned for long
                nursery.start_soon(serve_strangers, strangers)  # bounded counts of refused strangers
                nursery.start_soon(watch_links, transport, self.audit_log)  # links lost and back, audited
                if self.serve_control_api:
                    await self._start_control(nursery)
                nursery.start_soon(dialer.connect_loop, ctx)
                task_status.started(self)
                if gate is not None and not gate.approved:  # no training before the operator approved the study
                    self.progress.phase = "waiting-study-approval"
                    await gate.wait_approved()
                    self.progress.phase = "idle"
                await rounds.round_loop(ctx)
                if self.progress.phase != privacy.PHASE_EXHAUSTED:
                    self.progress.phase = "done"
                self.done.set()
                if config.rounds.count:
                    # after the last round, keep answering neighbours that are still finishing
                    await trio.sleep(config.rounds.deadline_seconds)
                nursery.cancel_scope.cancel()

    async def _start_control(self, nursery: trio.Nursery) -> None:
        try:
            self.control_port = await nursery.start(
                serve_control,
                self.operator,
                self.config.control.host,
                self.config.control.port,
                self.config.data_dir / TOKEN_FILE_NAME,
            )
        except OSError as exc:
            log.error("control API not started: %s", exc)


def _model_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The model's size as float32 on the wire (what a neighbour's full snapshot holds)."""
    return sum(4 * math.prod(shape) for shape in shapes.values())


def _last_good_model(store: Store) -> tuple[ModelRecord, StateDict] | None:
    """The newest stored model whose weights are all finite (a store from before the
    update bound may end with a poisoned one: resuming it would fail every round)."""
    for record in reversed([m for m in store.models() if m.origin != PERSONAL]):  # never resume a personal one
        try:
            state = store.load_model(record.digest)
        except Exception as exc:  # noqa: BLE001 - deleted or damaged weights: try the one before
            log.info("model %s of round %d cannot be loaded: %s", record.digest[:12], record.round, exc)
            continue
        why = state_violation(state, {})
        if why is None:
            return record, state
        log.warning("model %s of round %d is not used: %s", record.digest[:12], record.round, why)
    return None

