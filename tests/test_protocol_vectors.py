"""Deterministic test vectors; the same hex is published in docs/PROTOCOL.md."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from silomesh.protocol import (
    Ack,
    Identity,
    Update,
    UpdateAvailable,
    body_digest,
    encode_announce,
    encode_offer,
    open_envelope,
    peer_id_from_public_key,
    seal_envelope,
    state_digest,
)
from silomesh.protocol.crypto import decrypt_in_place

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
TS = 1_700_000_000_000
NONCE = bytes(range(24))
STATE = {"w": np.array([0.5, -1.0, 2.0], np.float32), "b": np.array([1, 2], np.int64)}
ROUTE = {
    "federation": "hospitals",
    "sender": ALICE.public_key,
    "recipient": BOB.public_key,
    "round": 3,
}

VECTORS = {
    "alice_ed25519": "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c",
    "alice_x25519": "1b1b58dd50ea14b60da17b790cd02754d970c9bab864ebb3c0f3016fe51d3f57",
    "alice_peer_id": "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5",
    "bob_ed25519": "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394",
    "bob_x25519": "60346e7c911a5f6ba154129174cafe75b294ac3bbd5549632f48cec6266f8410",
    "box_shared_key": "13258dcfb05c10ba16a2005936b2d4cacb01ee3ef83a0887abd63e4a0b80b3f4",
    "state_digest": "cb0b8a6bd1eb7f9f34efd2061da7be3adc6cd144863a2f85d1b9234c7651f3e4",
    "ack_frame": (
        "00000173010a8ca776657273696f6e02a46b696e64a361636baa66656465726174696f6ea9686f737069"
        "74616c73a673656e646572c4208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b4"
        "0f6f5ca9726563697069656e74c4208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f"
        "5b8fc9b394a5726f756e6403a873657175656e636501a974696d657374616d70cf0000018bcfe56800ab"
        "626173655f646967657374c0ae7061796c6f61645f646967657374c420ec78933510cb2eec76138bbd1d"
        "b09c1b94b032b5a8d308f49d7ccca5f0226c61a5636f646563a46e6f6e65a56e6f6e6365c41800010203"
        "0405060708090a0b0c0d0e0f1011121314151617c67e1e67757c9bfbedce852b711afae80fce95a94f64"
        "bacc7611b976082d65f44785eaf01dc8b5a46014d7f9cce8e0cb6e54223a9a54a3dd9f372663e4262505"
        "614c3ba0643c8d36f36c2af22fa67a4bc378ddb1dec9de87b0cbaa210ad31c6b74d441a9e12458"
    ),
    "update_payload": (
        "0000006984a96e5f73616d706c65730aac73746174655f646967657374c420cb0b8a6bd1eb7f9f34efd2"
        "061da7be3adc6cd144863a2f85d1b9234c7651f3e4a76d65747269637380a774656e736f72739295a162"
        "a5696e743634910200c095a177a7666c6f61743332910310c00100000000000000020000000000000000"
        "00003f000080bf00000040"
    ),
    "update_frame": (
        "000001eb01108ca776657273696f6e02a46b696e64a6757064617465aa66656465726174696f6ea9686f"
        "73706974616c73a673656e646572c4208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf374"
        "8801b40f6f5ca9726563697069656e74c4208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a2"
        "5df60f5b8fc9b394a5726f756e6403a873657175656e636502a974696d657374616d70cf0000018bcfe5"
        "6800ab626173655f646967657374c0ae7061796c6f61645f646967657374c420fde9782d98b720ccffee"
        "264538a203ab19999a920a795838c3b2889726a50f41a5636f646563a7666c6f61743332a56e6f6e6365"
        "c418000102030405060708090a0b0c0d0e0f10111213141516172762f0e7d625c563761ae1b4803f0f95"
        "3659317177cb7c241741fe3adc935d17e3a32722caffcca04e4e0e2849d436ccf9ebacf7c2d811a43034"
        "e52f4a8ca006638278d9559023b3f3b6fde62e555349c378ddcbd8c8c2bdb3c6be0e12d96fc5b6c841ad"
        "372e6c43f146f56db4897cccd18083d6378946c65d2aa7fd2da611a63a50aa5d738b1159776b90ce6d92"
        "1465f035004edc7dfb087f6921c37fe91def51cc8165997c4f8b889dbc5fa5370489275a71ca11558015"
        "d77e69ef1ea00772486f489855d702232b82c7ee2be23c36d652ccbc719ed94bfa"
    ),
    "announce": (
        "822b87caac21acfd61a1c9b5f7333ac7e9268d40ae55ca4ac4d6178b297ce782a8b7180cc541b9de0b05"
        "98fe2f3984af08f5a16ae2c0f699e10563d128fedc098ba776657273696f6e02a46b696e64a8616e6e6f"
        "756e6365a56576656e74b07570646174652d617661696c61626c65aa66656465726174696f6ea9686f73"
        "706974616c73a673656e646572c4208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf37488"
        "01b40f6f5ca9726563697069656e74c0a5726f756e6403a873657175656e636503a974696d657374616d"
        "70cf0000018bcfe56800a6646967657374c420cb0b8a6bd1eb7f9f34efd2061da7be3adc6cd144863a2f"
        "85d1b9234c7651f3e4a473697a651c"
    ),
    # section 4.1: the offer of the ack frame's body (0xFFFFFFFF, its BLAKE2b-256, its length)
    "ack_offer": "ffffffff63abc1a6adb224cce083ea7e9a893ca29b590b581292d98e446158b299c3641500000173",
}


def _computed() -> dict[str, str]:
    ack = seal_envelope(
        Ack(**ROUTE, sequence=1, reply_to=0, note="ok"), ALICE, timestamp_ms=TS, nonce=NONCE
    )
    update = seal_envelope(
        Update(**ROUTE, sequence=2, tensors=STATE, n_samples=10, state_digest=state_digest(STATE)),
        ALICE,
        timestamp_ms=TS,
        nonce=NONCE,
    )
    payload = bytes(
        decrypt_in_place(bytearray(update.ciphertext), BOB.shared_key(ALICE.public_key), NONCE)
    )
    announce = encode_announce(
        UpdateAvailable(
            federation="hospitals",
            sender=ALICE.public_key,
            round=3,
            sequence=3,
            digest=state_digest(STATE),
            size=sum(a.nbytes for a in STATE.values()),
        ),
        ALICE,
        timestamp_ms=TS,
    )
    return {
        "alice_ed25519": ALICE.public_key.hex(),
        "alice_x25519": bytes(ALICE.box_public_key).hex(),
        "alice_peer_id": peer_id_from_public_key(ALICE.public_key),
        "bob_ed25519": BOB.public_key.hex(),
        "bob_x25519": bytes(BOB.box_public_key).hex(),
        "box_shared_key": ALICE.shared_key(BOB.public_key).hex(),
        "state_digest": state_digest(STATE).hex(),
        "ack_frame": ack.to_frame().hex(),
        "update_payload": payload.hex(),
        "update_frame": update.to_frame().hex(),
        "announce": announce.hex(),
        "ack_offer": encode_offer(body_digest(ack.to_bytes()), ack.size).hex(),
    }


@pytest.mark.parametrize("name", list(VECTORS))
def test_encoder_reproduces_the_published_vector(name: str) -> None:
    assert _computed()[name] == VECTORS[name]


def test_published_update_vector_opens_to_the_original_message() -> None:
    frame = bytes.fromhex(VECTORS["update_frame"])
    opened = open_envelope(
        frame[4:], identity=BOB, federation="hospitals", trusted={ALICE.public_key}
    )
    assert opened.message == Update(**ROUTE, sequence=2, tensors=STATE, n_samples=10, state_digest=state_digest(STATE))


@pytest.mark.parametrize("name", list(VECTORS))
def test_protocol_doc_publishes_the_vector(name: str) -> None:
    doc = re.sub(r"\s+", "", DOC.read_text(encoding="utf-8"))
    assert VECTORS[name] in doc


def test_the_published_answers_resume_the_offered_ack() -> None:
    """A receiver holding nothing answers 00000000; one that kept 100 bytes answers 00000064,
    and the body completed from those 100 bytes and the rest is the ack, digest checked."""
    from silomesh.protocol import FrameDecoder, FrameOffer

    body = bytes.fromhex(VECTORS["ack_frame"])[4:]
    for held, answer in ((b"", "00000000"), (body[:100], "00000064")):
        decoder = FrameDecoder(1 << 20, resumable=True)
        decoder.receive_data(bytes.fromhex(VECTORS["ack_offer"]))
        assert isinstance(decoder.next_frame(), FrameOffer)
        assert decoder.answer_offer(held).hex() == answer
        decoder.receive_data(body[len(held) :])
        assert decoder.next_frame() == body
    doc = re.sub(r"\s+", "", DOC.read_text(encoding="utf-8"))
    assert VECTORS["ack_offer"] + "0000000000000064" in doc
