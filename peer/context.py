"""The round context: everything the stream handlers and the round loop may use, typed.

The daemon (:mod:`silomesh.peer.daemon`) builds one :class:`RoundContext` when it starts
and passes it explicitly to :mod:`~silomesh.peer.handlers` (a neighbour talks to us),
:mod:`~silomesh.peer.dialer` (we talk to a neighbour) and :mod:`~silomesh.peer.rounds`
(the round loop). Nothing else is shared between them:

* :class:`Endpoint`: who we are on the wire (keys, federation, trust list, replay
  guard, limits, sequence counter, audit journal, transport) and how a message to a
  neighbour is addressed;
* :class:`Inbox`: the neighbours' models by round, as typed :class:`Received` entries;
* :class:`Bases`: the states a neighbour acknowledged from us, and the last state we
  reconstructed from each neighbour (the bases of deltas in both directions);
* :class:`Progress`: the current round and phase (read by the operator's status);
* :class:`Compute`: where torch work runs (a worker thread under a limiter of one).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from silomesh.peer.config import PersonalConfig
from silomesh.peer.exchange import STREAM_THRESHOLD, AuditRecord, Timeouts, Wire
from silomesh.peer.secure_state import SecureState
from silomesh.peer.transfers import BufferBudget, Transfers
from silomesh.peer.transport import Stream, Transport
from silomesh.protocol import Codec, Hello, Identity, Limits, Message, ReplayGuard, Role, Session
from silomesh.protocol.peerid import public_key_from_peer_id
from silomesh.protocol.study import hello_model
from silomesh.strategies import StateDict

if TYPE_CHECKING:
    from silomesh.peer.audit import AuditLog
    from silomesh.peer.config import RoundConfig, TrustedPeer
    from silomesh.peer.consent import Consent
    from silomesh.peer.faults import FaultHooks
    from silomesh.peer.learner import Learner
    from silomesh.peer.store import Store
    from silomesh.peer.study import StudyGate

log = logging.getLogger(__name__)

T = TypeVar("T")

AGENT = "silomesh/0.1"
CODECS = ("float32", "float16", "int8")
"""What our hello says we decode. ``int4`` and ``topk`` are listed only by a peer whose own
``[rounds] codec`` is that codec (:func:`hello_codecs`): peers before them refuse a hello naming a
codec they do not know."""

LATER_CODECS = ("int4", "topk")
"""Codecs added after :data:`CODECS`, listed only by peers set to them."""


def hello_codecs(codec: str) -> tuple[str, ...]:
    """The codecs a peer whose ``[rounds] codec`` is ``codec`` lists in its hello."""
    return CODECS + ((codec,) if codec in LATER_CODECS else ())


class SequenceCounter:
    """Message sequence numbers, strictly increasing across restarts.

    The counter follows the microsecond wall clock and never repeats, so a restarted
    peer never reuses a (sender, round, sequence) its neighbours' replay guards saw.
    """

    def __init__(self, clock_us: Callable[[], int] = lambda: time.time_ns() // 1000) -> None:
        self._last = 0
        self._clock_us = clock_us

    def next(self) -> int:
        self._last = max(self._last + 1, self._clock_us())
        return self._last


@dataclass(frozen=True)
class Trust:
    """The trust list: neighbours by PeerID, and their Ed25519 public keys."""

    peers: Mapping[str, TrustedPeer]

    @functools.cached_property
    def keys(self) -> frozenset[bytes]:
        return frozenset(p.public_key for p in self.peers.values())

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self.peers

    def __iter__(self) -> Iterator[str]:
        return iter(self.peers)

    def __len__(self) -> int:
        return len(self.peers)

    def name(self, peer_id: str) -> str:
        return self.peers[peer_id].name

    @staticmethod
    def public_key_of(peer_id: str) -> bytes:
        return public_key_from_peer_id(peer_id)


class Journal:
    """Where the exchange's audit records go: the signed audit log, refusal counts, replay marks.

    Every refusal of a trusted neighbour's message is counted against it in the store
    (with the latest reason, shown to the operator); every envelope accepted from a
    neighbour moves its persisted replay mark (PROTOCOL.md section 11), so a restarted
    peer still refuses what it accepted before.
    """

    def __init__(self, audit_log: AuditLog, store: Store, trusted: Container[str] = frozenset()) -> None:
        self.audit_log = audit_log
        self.store = store
        self.trusted = trusted

    def record(self, rec: AuditRecord) -> None:
        """Audit sink of :class:`~silomesh.peer.exchange.Wire`; refusals count toward distrust.

        The entry, the refusal count and the replay mark are one transaction: one commit
        (and fsync) per envelope, and a crash keeps all of them or none."""
        with self.store.atomic():
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
                self.store.count_refused(rec.peer, rec.reason)
            if rec.direction != "sent" and rec.sequence >= 0 and rec.envelope_header is not None:
                # the envelope authenticated and took its replay slot: remember it across restarts
                self.store.note_replay_mark(public_key_from_peer_id(rec.peer), max(rec.round, 0), rec.sequence)

    def refused(self, peer: str, kind: str, reason: str, *, round: int = -1, blame: bool = True) -> None:
        """Audit a refusal that is not one envelope (an announce, a drop, a timeout).

        It counts against ``peer`` when ``peer`` is a trusted neighbour (strangers are
        aggregated by the transport, not given a row each) and ``blame`` (not when the
        cause is ours, e.g. a study our operator has not approved yet).
        """
        self.audit_log.append("refused", peer, kind, round=round, reason=reason)
        if blame and peer in self.trusted:
            self.store.count_refused(peer, reason)


@dataclass
class Progress:
    """The round the peer is in and what it is doing (``status`` shows both)."""

    round: int = -1
    phase: str = "starting"
    #: when the phase began (time.time()); set whenever ``phase`` changes
    since: float = field(default_factory=time.time)
    #: neighbour -> what this round still waits for from it ("push: sending our update",
    #: "its update"): what a stuck round is stuck on (simnet's watchdog reports it)
    waiting_on: dict[str, str] = field(default_factory=dict)
    #: the neighbours whose contribution this round waits for
    awaiting: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: object) -> None:
        if name == "phase" and value != getattr(self, "phase", None):
            object.__setattr__(self, "since", time.time())
        object.__setattr__(self, name, value)

    @property
    def wire_round(self) -> int:
        """The round our messages carry (0 before the first round)."""
        return max(self.round, 0)


@dataclass(frozen=True)
class Endpoint:
    """Who we are on the wire, and how our messages to neighbours are addressed."""

    crypto: Identity
    peer_id: str
    federation: str
    model_id: str
    trust: Trust
    replay: ReplayGuard
    limits: Limits
    sequence: SequenceCounter
    journal: Journal
    transport: Transport
    progress: Progress
    timeouts: Timeouts = field(default_factory=Timeouts)
    budget: BufferBudget | None = None
    #: tensor bytes from which an update is streamed on a 1.2.0 stream (0: never)
    stream_threshold: int = STREAM_THRESHOLD
    #: envelopes further than this from our clock are refused (STALE); None: no check
    max_skew_ms: int | None = None
    #: tensor messages of rounds outside ``current +- round_window`` are refused (BAD_ROUND)
    round_window: int = 2
    #: the model's tensor dtypes: a float weight arriving as int32 or bool is refused (BAD_DTYPE)
    expected_dtypes: Mapping[str, str] | None = None
    #: the study ``[study]`` names and its approval; None: no study (docs/PRIVACY.md)
    study: StudyGate | None = None
    #: frames cut off by a broken stream, kept to resume them (PROTOCOL.md section 4.1)
    transfers: Transfers = field(default_factory=Transfers)
    #: the codecs our hello lists (a neighbour sends us updates only in these)
    codecs: tuple[str, ...] = CODECS

    def announce_routing(self, round: int | None = None) -> dict[str, Any]:
        """Routing fields of a new announce (no recipient; default: the current round)."""
        return {
            "federation": self.federation,
            "sender": self.crypto.public_key,
            "round": self.progress.wire_round if round is None else round,
            "sequence": self.sequence.next(),
        }

    def routing(self, recipient: bytes, round: int | None = None) -> dict[str, Any]:
        """Routing fields of a new message to ``recipient`` (default: the current round)."""
        return {**self.announce_routing(round), "recipient": recipient}

    def reply_routing(self, msg: Message, round: int | None = None) -> dict[str, Any]:
        """Routing fields of our reply to ``msg`` (same federation, back to its sender)."""
        return {**self.routing(msg.sender, round), "federation": msg.federation}

    def hello(self, recipient: bytes, base_digest: bytes | None = None) -> Hello:
        """Our hello; ``base_digest`` names the last state we accepted from ``recipient`` (PROTOCOL.md 7)."""
        return Hello(
            **self.routing(recipient),
            agent=AGENT,
            model=hello_model(self.model_id, None if self.study is None else self.study.study.digest),
            state_digest=base_digest,
            codecs=self.codecs,
            max_frame_size=self.limits.max_frame_size,
        )

    def wire(self, role: Role, stream: Stream, expected_shapes: Mapping[str, tuple[int, ...]]) -> Wire:
        """A sans-I/O session with ``stream.remote`` bound to ``stream``, audited to the journal."""
        session = Session(
            role,
            identity=self.crypto,
            peer=self.trust.public_key_of(stream.remote),
            federation=self.federation,
            replay=self.replay,
            limits=self.limits,
            expected_shapes=dict(expected_shapes),
            expected_dtypes=self.expected_dtypes,
            complete=False,
            max_skew_ms=self.max_skew_ms,
            next_sequence=self.sequence.next,
            resumable=stream.resumable,
            streamed=stream.streamed,
        )
        return Wire(
            session,
            stream,
            self.journal.record,
            timeouts=self.timeouts,
            budget=self.budget,
            transfers=self.transfers,
            stream_threshold=self.stream_threshold,
        )


@dataclass(frozen=True)
class Received:
    """A neighbour's model of a round, as reconstructed from its update.

    ``degree`` and ``loss`` are read from the update's metrics map once, here: the
    sender's number of trusted neighbours (Metropolis weights) and its training loss
    (FedMix weights); ``lap_count`` and ``tree_count`` as sent (how many peers' models
    ``cyclic``'s lap mean and a tree round's mean hold; checked where used).
    """

    peer_id: str
    round: int
    state: StateDict
    n_samples: int
    loss: float | None = None
    degree: int | None = None
    lap_count: float | None = None
    tree_count: float | None = None

    @classmethod
    def from_metrics(
        cls, peer_id: str, round: int, state: StateDict, n_samples: int, metrics: Mapping[str, float]
    ) -> Received:
        loss = metrics.get("loss")
        degree = metrics.get("degree")
        lap_count = metrics.get("lap_count")
        tree_count = metrics.get("tree_count")
        return cls(
            peer_id,
            round,
            state,
            n_samples,
            loss=float(loss) if loss is not None and math.isfinite(loss) else None,
            degree=int(degree) if degree is not None and math.isfinite(degree) and degree >= 1 else None,
            lap_count=float(lap_count) if lap_count is not None else None,
            tree_count=float(tree_count) if tree_count is not None else None,
        )


class Inbox:
    """Neighbours' models by round, and a way to wait for a round's.

    A round takes each neighbour's model of that round when it arrived, else its newest of a
    later round (a neighbour ahead of us); a faster neighbour's next model does not replace
    the one of the round we are still in, so what a round averages does not depend on how
    fast the neighbours are. Per neighbour the inbox keeps its newest model and those of
    rounds from ours on (a neighbour ahead of us: the round window bounds them); in step, that
    is one model per neighbour.

    A neighbour we could not reach in this round is not waited for, until the connect
    loop reaches it again.
    """

    def __init__(self) -> None:
        self._models: dict[str, dict[int, Received]] = {}
        self._round = 0
        self._unreachable: set[str] = set()
        self._changed = trio.lowlevel.ParkingLot()

    def put(self, entry: Received) -> None:
        """``entry`` arrived (a second model of the same round replaces the first)."""
        rounds = self._models.setdefault(entry.peer_id, {})
        rounds[entry.round] = entry
        self._prune(rounds)
        self._changed.unpark_all()

    def _prune(self, rounds: dict[int, Received]) -> None:
        newest = max(rounds)
        for r in [r for r in rounds if r < self._round and r != newest]:
            del rounds[r]

    def get(self, peer: str, round: int) -> Received | None:
        """``peer``'s model of ``round`` if it arrived, else its newest of a later round."""
        rounds = self._models.get(peer)
        if not rounds:
            return None
        if round in rounds:
            return rounds[round]
        newest = max(rounds)
        return rounds[newest] if newest > round else None

    def new_round(self, round: int) -> None:
        """Round ``round`` starts: forget who was unreachable (every neighbour is waited for
        again) and the models of earlier rounds but each neighbour's newest (``cyclic``'s
        first peer asks for its predecessor's model of the round before)."""
        self._round = round
        self._unreachable.clear()
        for rounds in self._models.values():
            self._prune(rounds)

    def unreachable(self, peer: str) -> None:
        """Stop waiting for ``peer`` in this round."""
        self._unreachable.add(peer)
        self._changed.unpark_all()

    def reachable(self, peer: str) -> None:
        """``peer`` is connected again: wait for it after all."""
        self._unreachable.discard(peer)

    def waiting(self, peers: set[str], round: int) -> set[str]:
        """The reachable ``peers`` whose model of ``round`` has not arrived."""
        return {p for p in peers - self._unreachable if self.get(p, round) is None}

    async def wait_for(self, peers: set[str], round: int) -> None:
        """Return once every reachable peer in ``peers`` has a model of ``round`` here."""
        while self.waiting(peers, round):
            await self._changed.park()


@dataclass(frozen=True)
class Base:
    """A state both sides of an exchange hold, named by its digest (the base of a delta)."""

    digest: bytes
    state: StateDict


@dataclass
class Bases:
    """Delta bases in both directions, per neighbour."""

    #: the last state each neighbour acknowledged from us (our next delta's base)
    acked: dict[str, Base] = field(default_factory=dict)
    #: the last state we reconstructed from each neighbour (its next delta's base)
    received: dict[str, Base] = field(default_factory=dict)
    #: the neighbours whose acknowledged base of ours came from a topk delta: they hold only
    #: part of our model (the exchange round counts them through consensus views)
    sparse: set[str] = field(default_factory=set)

    def acknowledged(self, neighbour: str, base: Base, codec: Codec) -> None:
        """``neighbour`` acknowledged ``base``, sent as ``codec``."""
        self.acked[neighbour] = base
        if codec is Codec.TOPK:
            self.sparse.add(neighbour)
        else:
            self.sparse.discard(neighbour)


class Compute(Protocol):
    """Where synchronous work runs: torch compute, and blocking file I/O."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Torch work, one job at a time."""

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking I/O (loading data, writing model files), not limited."""


class ThreadCompute:
    """Production: worker threads; torch work one job at a time, so a peer never trains
    two things at once and the trio loop keeps serving neighbours meanwhile."""

    def __init__(self, limiter: trio.CapacityLimiter | None = None) -> None:
        """``limiter``: share one with other peers of the process (simnet: one slot per core);
        our own jobs still run one at a time."""
        self._own = trio.CapacityLimiter(1)
        self._shared = limiter

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        # ours first: waiting for it holds none of the shared slots
        async with self._own, self._shared or contextlib.nullcontext():
            return await trio.to_thread.run_sync(fn, *args)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args)


class InlineCompute:
    """Tests under trio's ``MockClock``: run on the loop, so virtual time stands still
    while the work runs (autojump would otherwise jump the clock while a thread works)."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.run(fn, *args)


@dataclass(frozen=True)
class RoundContext:
    """What the handlers and the round loop need, passed explicitly (module docstring)."""

    endpoint: Endpoint
    rounds: RoundConfig
    participation: str
    learner: Learner
    store: Store
    consent: Consent
    faults: FaultHooks
    compute: Compute
    inbox: Inbox = field(default_factory=Inbox)
    bases: Bases = field(default_factory=Bases)
    #: the round each neighbour's latest hello carried (its round clock, for catching up)
    neighbour_rounds: dict[str, int] = field(default_factory=dict)
    #: a personal model after each round (peer/personal.py); off by default
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    #: secure aggregation's memory: groups joined as a member, our models offered to them
    secure: SecureState = field(default_factory=SecureState)

    def catch_up_round(self, round: int) -> int:
        """The round to run next: ``round``, or, when we fell behind by more than the
        round window (a long stop), the median of our neighbours' rounds, so that they
        accept our updates again. One neighbour alone cannot move a median of several."""
        known = sorted(self.neighbour_rounds.values())
        if not known:
            return round
        median = known[(len(known) - 1) // 2]
        return median if median > round + self.endpoint.round_window else round

    @property
    def progress(self) -> Progress:
        return self.endpoint.progress

    @property
    def peer_id(self) -> str:
        return self.endpoint.peer_id

    @property
    def transport(self) -> Transport:
        return self.endpoint.transport

    @property
    def trust(self) -> Trust:
        return self.endpoint.trust

    def selected_neighbours(self) -> list[str]:
        """Trusted neighbours the operator has not deselected, in trust-list order."""
        deselected = self.store.deselected_neighbours()
        return [p for p in self.trust if p not in deselected]
