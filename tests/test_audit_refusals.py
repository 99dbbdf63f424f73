"""A message a peer declines after it authenticated is one ``refused`` entry that an auditor can check.

A real peer (manual participation: it stays in round 0) on the in-memory transport under
trio's MockClock; a trusted neighbour speaks the protocol by hand (:mod:`handkit`) and
keeps its own audit log of what it sent. The peer refuses an update whose state does
not have the announced digest: its log records that envelope once, as ``refused`` with
the signed header and the error code, the log verifies (the neighbour's envelope
signature included), and reconcile pairs the neighbour's send with the refusal.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from handkit import Neighbour
from memnet import MemoryNetwork, StartTogether
from peerkit import configs

from silomesh.audit.logfile import load_log
from silomesh.audit.reconcile import reconcile
from silomesh.audit.verify import verify_log
from silomesh.peer.audit import AuditLog
from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.store import Store
from silomesh.protocol import Ack, ErrorCode, ErrorMessage, OpenedEnvelope
from silomesh.protocol.envelope import SealedEnvelope

Clock = trio.testing.MockClock


def _record_sent(log: AuditLog, recipient: str, sealed: SealedEnvelope) -> None:
    log.append(
        "sent",
        recipient,
        sealed.header.kind.value,
        round=sealed.header.round,
        payload_digest=sealed.header.payload_digest.hex(),
        size=sealed.size,
        envelope_sig=sealed.signature.hex(),
        envelope_header=sealed.header_bytes,
    )


async def test_a_declined_update_is_one_refused_entry_that_verifies_and_reconciles(
    tmp_path: Path, autojump_clock: Clock
) -> None:
    net = MemoryNetwork()
    ids, cfgs = configs(tmp_path, 2, rounds=1, participation="manual")
    victim = Peer(
        cfgs[0],
        identity=ids[0],
        serve_control_api=False,
        transport=net.open,
        compute=InlineCompute(),
        faults=StartTogether(net, 1),
    )
    hand = Neighbour(ids[1].seed, ids[0].public_key, cfgs[0].federation)
    hand_store = Store(tmp_path / "hand" / "store.sqlite")
    hand_log = AuditLog(hand_store, ids[1].signing_key)
    victim_id = ids[0].peer_id_text
    sent: dict[str, SealedEnvelope] = {}
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(victim.run)
            async with net.open(ids[1], "", {victim_id: ""}) as transport:
                assert await transport.connect(victim_id)
                state = {k: v.copy() for k, v in victim.learner.state().items()}
                for name, message in (
                    ("wrong", hand.update(state, state_digest=b"\x01" * 32)),
                    ("right", hand.update(state)),
                ):
                    stream = await transport.open_stream(victim_id)
                    session, _ = await hand.hello(stream)
                    # the neighbour's log keeps only its updates: reconcile is checked for those below
                    sealed = session.send(message)
                    sent[name] = sealed
                    _record_sent(hand_log, victim_id, sealed)
                    await stream.write(sealed.to_frame())
                    answer = await hand.next(session, stream)
                    assert isinstance(answer, OpenedEnvelope)
                    if name == "wrong":
                        assert isinstance(answer.message, ErrorMessage)
                        assert answer.message.code == ErrorCode.STATE_MISMATCH
                    else:
                        assert isinstance(answer.message, Ack)
                    await stream.close()
            nursery.cancel_scope.cancel()
    hand_store.close()

    victim_log = load_log(cfgs[0].data_dir / "store.sqlite")
    wrong_sig = sent["wrong"].signature.hex()
    records = [e for e in victim_log.entries if e["envelope_sig"] == wrong_sig]
    assert [(e["direction"], e["kind"]) for e in records] == [("refused", "update")], "recorded once, as refused"
    (refused,) = records
    assert refused["envelope_header"] == sent["wrong"].header_bytes.hex()
    assert str(refused["reason"]).startswith("STATE_MISMATCH: ")
    report = verify_log(victim_log)
    assert report.ok, report.findings
    assert report.envelope_signatures_checked >= 2  # the refused envelope's signature is checked too

    both = reconcile([victim_log, load_log(tmp_path / "hand" / "store.sqlite")])
    assert both.matched == 2, "the neighbour's two updates: one matched to a receive, one to the refusal"
    assert [(x.recipient_entry, x.reason.split(":")[0]) for x in both.refused] == [(refused["seq"], "STATE_MISMATCH")]
    assert [d for d in both.discrepancies if d.kind == "update"] == []
