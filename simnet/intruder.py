"""An untrusted host that tries to talk to federation peers (the ``intruder=N`` fault).

The intruder is a production mesh (Noise, Yamux) with its own key, which nobody in the
federation trusts. It trusts its targets, so its own side of the trust gate lets it
dial them; then, per attempt, it connects, opens an exchange stream and writes a
properly sealed ``hello`` envelope followed by garbage bytes, and waits briefly for an
answer. The victims must refuse: they close the connection (audited ``refused``,
reason ``untrusted-connection``), reset any stream that got through
(``untrusted-stream``) and never answer. The counts here are the "injected" side;
the victims' audit logs give the "observed" side.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import trio

from silomesh.peer.identity import PeerIdentity
from silomesh.peer.mesh import Mesh, StreamClosed, open_mesh
from silomesh.protocol import DEFAULT_LIMITS, Hello, Identity, ReplayGuard, Role, Session
from silomesh.simnet.faultspec import IntruderPlan

log = logging.getLogger(__name__)

#: seconds an intruder waits for any answer after writing its frames
ANSWER_WAIT = 1.0


@dataclass
class IntruderReport:
    index: int
    peer_id: str
    attempts: int = 0  # connection attempts
    connections: int = 0  # Noise handshakes that completed (the victim saw a connection)
    stream_attempts: int = 0  # exchange streams it tried to open
    streams: int = 0  # exchange streams the intruder managed to open
    frames: int = 0  # frames written without an error on the intruder's side
    answers: int = 0  # reads that returned data (a victim answered: must stay 0)
    errors: int = 0


def intruder_identity(seed: int, index: int) -> PeerIdentity:
    return PeerIdentity.from_seed(hashlib.sha256(f"silomesh-simnet/{seed}/intruder/{index}".encode()).digest())


async def run_intruder(
    plan: IntruderPlan,
    targets: dict[str, str],
    federation: str,
    seed: int,
    *,
    pause: float = 1.0,
) -> IntruderReport:
    """Attack ``targets`` (PeerID -> address) ``plan.attempts`` times each."""
    identity = intruder_identity(seed, plan.index)
    report = IntruderReport(plan.index, identity.peer_id_text)
    crypto = Identity.from_seed(identity.seed)
    async with open_mesh(identity, "/ip4/127.0.0.1/tcp/0", targets) as mesh:
        for attempt in range(plan.attempts):
            for victim in targets:
                await _attempt(mesh, victim, crypto, federation, report)
            if attempt + 1 < plan.attempts:
                await trio.sleep(pause)
    log.info("intruder %s: %s", identity.peer_id_text[-8:], report)
    return report


async def _attempt(mesh: Mesh, victim: str, crypto: Identity, federation: str, report: IntruderReport) -> None:
    from libp2p.peer.id import ID

    report.attempts += 1
    # start from a fresh connection so every attempt is one more connection to refuse
    mesh.connected.discard(victim)
    with trio.move_on_after(5):
        try:
            await mesh.host.disconnect(ID.from_base58(victim))
        except Exception:  # not connected is fine
            log.debug("intruder disconnect failed", exc_info=True)
    if not await mesh.connect(victim, timeout=5.0):
        return
    report.connections += 1
    report.stream_attempts += 1
    try:
        stream = await mesh.open_stream(victim)
    except StreamClosed:
        return
    report.streams += 1
    public = _public_key(victim)
    session = Session(Role.DIALER, identity=crypto, peer=public, federation=federation,
                      replay=ReplayGuard(), limits=DEFAULT_LIMITS)
    hello = Hello(federation=federation, sender=crypto.public_key, recipient=public, round=0,
                  sequence=1, agent="intruder/0", model="")
    try:
        head, body = session.send(hello).frame_parts()
        await stream.write(head + bytes(body))  # a well-formed, signed envelope
        report.frames += 1
        await stream.write(os.urandom(512))  # and garbage
        report.frames += 1
        with trio.move_on_after(ANSWER_WAIT):
            data = await stream.read_some()
            if data:
                report.answers += 1
    except StreamClosed:
        pass
    except Exception:  # the intruder only counts; it must not crash the run
        report.errors += 1
        log.debug("intruder attempt failed", exc_info=True)
    finally:
        await stream.reset()


def _public_key(peer_id: str) -> bytes:
    from silomesh.protocol.peerid import public_key_from_peer_id

    return public_key_from_peer_id(peer_id)
