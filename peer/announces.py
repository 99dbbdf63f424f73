"""Small signed announces on the federation's GossipSub topic: publish, and listen.

"Peer P has a new model for round r", "peer P has new data (n samples)", "peer P is
leaving". Announces are best effort and never carry weights; a forged, foreign or
replayed one is refused and audited.
"""

from __future__ import annotations

import logging
import time

from silomesh.peer.context import Endpoint, RoundContext
from silomesh.protocol import (
    Leaving,
    NewData,
    RemoteProtocolError,
    UpdateAvailable,
    announce_topic,
    decode_announce,
    encode_announce,
)

log = logging.getLogger(__name__)


async def publish(endpoint: Endpoint, announce: UpdateAvailable | NewData | Leaving) -> None:
    """Publish an announce (best effort: a failure is logged, never raised)."""
    try:
        data = encode_announce(announce, endpoint.crypto)
        await endpoint.transport.publish(announce_topic(endpoint.federation), data)
    except Exception as exc:  # noqa: BLE001 - announcing is best effort
        log.info("announce %s not published: %s", type(announce).__name__, exc)


async def announce_new_data(endpoint: Endpoint, n_samples: int, manifest_digest: bytes) -> None:
    announce = NewData(**endpoint.announce_routing(), n_samples=n_samples, manifest_digest=manifest_digest)
    await publish(endpoint, announce)


async def listen_announces(ctx: RoundContext) -> None:
    """Record neighbours' announces (last seen, new data); refuse forged or foreign ones."""
    endpoint = ctx.endpoint
    async for sender, data in endpoint.transport.subscribe(announce_topic(endpoint.federation)):
        try:
            received = decode_announce(
                data,
                federation=endpoint.federation,
                trusted=set(endpoint.trust.keys),
                me=endpoint.crypto.public_key,
                expected_sender=endpoint.trust.public_key_of(sender),
                replay=endpoint.replay,
                now_ms=time.time_ns() // 1_000_000 if endpoint.max_skew_ms is not None else None,
                max_skew_ms=endpoint.max_skew_ms,
            )
        except RemoteProtocolError as exc:
            endpoint.journal.refused(sender, "announce", f"{exc.code.value}: {exc.message}")
            continue
        if endpoint.study is not None and not endpoint.study.approved:  # nothing of a study we did not approve
            endpoint.journal.refused(sender, "announce", f"REFUSED: study {endpoint.study.study.label} is not "
                                     "approved by this hospital's operator yet", blame=False)
            continue
        announce = received.announce
        ctx.store.note_replay_mark(endpoint.trust.public_key_of(sender), announce.round, announce.sequence)
        ctx.store.note_seen(sender)
        if isinstance(announce, NewData):
            ctx.store.upsert_neighbour(
                sender, samples=announce.n_samples, data_digest=announce.manifest_digest.hex(),
                data_announced_at=time.time(),
            )
        elif isinstance(announce, Leaving):
            endpoint.transport.forget(sender)
