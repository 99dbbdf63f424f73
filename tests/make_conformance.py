"""Generate docs/conformance/*.json: the protocol's conformance suite, as data.

Run ``.venv/bin/python tests/make_conformance.py`` after a deliberate protocol change and
commit the files it rewrites; ``tests/test_protocol_conformance.py`` fails when the files
differ from what this script produces, or when the reference implementation gives
another outcome than a file records. Everything is fixed (seeds, clock, nonces,
timestamps), so the output is byte-for-byte reproducible.

Each case is written with the outcome it is *meant* to have (an error code, and whether a
signed ``error`` answers it); the script runs the reference on the case as written in the
JSON (:func:`run_case`, which reads nothing but the JSON) and refuses to write a file in
which the reference disagrees. Accepted cases record the reference's decoded summary.
The format is described in docs/conformance/README.md.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from nacl.public import Box, PublicKey

from silomesh.protocol import (
    ANNOUNCE_SIGNING_DOMAIN,
    CLOSED,
    ENVELOPE_SIGNING_DOMAIN,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    ErrorCode,
    ErrorMessage,
    Hello,
    Identity,
    Leaving,
    Limits,
    Message,
    NeedBase,
    NewData,
    OpenedEnvelope,
    RemoteProtocolError,
    ReplayGuard,
    Role,
    SealedEnvelope,
    Session,
    TensorMessage,
    TrainRequest,
    TrainResult,
    Update,
    UpdateAvailable,
    apply_delta,
    authenticate_envelope,
    decode_announce,
    encode_announce,
    make_delta,
    open_authenticated,
    peer_id_from_public_key,
    seal_envelope,
    state_digest,
    x25519_public_key,
)
from silomesh.protocol.crypto import decrypt_in_place
from silomesh.protocol.secagg_messages import (
    SecaggCommit,
    SecaggDeal,
    SecaggGroup,
    SecaggMasked,
    SecaggRelease,
    SecaggShares,
)

OUT = Path(__file__).resolve().parents[1] / "docs" / "conformance"
FORMAT = "silomesh-conformance/1"

SEEDS = {"alice": b"\x01" * 32, "bob": b"\x02" * 32, "carol": b"\x03" * 32}
IDS = {name: Identity.from_seed(seed) for name, seed in SEEDS.items()}
ALICE, BOB, CAROL = IDS["alice"], IDS["bob"], IDS["carol"]
FED = "hospitals"
NOW = 1_700_000_000_000
SKEW = 900_000
VECTOR_NONCE = bytes(range(24))
STATE: dict[str, np.ndarray] = {"w": np.array([0.5, -1.0, 2.0], np.float32), "b": np.array([1, 2], np.int64)}

Case = dict[str, Any]


# ---------------------------------------------------------------- JSON <-> values


def _bytes_of(value: object) -> bytes:
    """A byte string field: hex, or ``{"hex": ..., "zeros": n}`` (hex then n zero bytes)."""
    if isinstance(value, str):
        return bytes.fromhex(value)
    if isinstance(value, dict):
        return bytes.fromhex(value.get("hex", "")) + bytes(int(value.get("zeros", 0)))
    raise TypeError(f"not a byte string field: {value!r}")


def _key(name: str) -> bytes:
    return IDS_FROM_JSON[name].public_key


IDS_FROM_JSON: dict[str, Identity] = {}
"""Identities as :func:`run_case` reads them from a file's ``identities`` (seeds)."""


def _load_identities(identities: Mapping[str, Any]) -> None:
    IDS_FROM_JSON.clear()
    for name, entry in identities.items():
        IDS_FROM_JSON[name] = Identity.from_seed(bytes.fromhex(entry["seed"]))


def _jsonable(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, ErrorCode):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _tensor_json(arr: np.ndarray) -> dict[str, Any]:
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": little.tobytes().hex()}


def _tensor_from_json(entry: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    return np.frombuffer(bytes.fromhex(entry["data"]), dtype=dtype).reshape(entry["shape"]).copy()


def summarize(opened: OpenedEnvelope) -> dict[str, Any]:
    """What a decoder must have read from an accepted envelope."""
    header, message = opened.header, opened.message
    out: dict[str, Any] = {
        "kind": header.kind.value,
        "federation": header.federation,
        "sender": header.sender.hex(),
        "recipient": header.recipient.hex(),
        "round": header.round,
        "sequence": header.sequence,
        "timestamp": header.timestamp,
        "codec": header.codec.value,
        "base_digest": _jsonable(header.base_digest),
        "body": _jsonable(message.body()),
    }
    if isinstance(message, TensorMessage):
        tensors = dict(message.tensors)
        out["tensors"] = {name: _tensor_json(tensors[name]) for name in sorted(tensors)}
        out["tensors_state_digest"] = state_digest(tensors).hex()
    return out


# ---------------------------------------------------------------- the reference runner


def _model(case: Case) -> tuple[dict[str, tuple[int, ...]] | None, dict[str, str] | None, bool]:
    model = case.get("model")
    if not model:
        return None, None, False
    shapes = {k: tuple(v) for k, v in model["shapes"].items()} if "shapes" in model else None
    return shapes, model.get("dtypes"), bool(model.get("complete", False))


def _guard(case: Case) -> ReplayGuard:
    marks = {_key(sender): (rnd, seq) for sender, rnd, seq in case.get("replay_low_water_marks", [])}
    guard = ReplayGuard(low_water_marks=marks)
    for sender, rnd, seq in case.get("replay_seen", []):
        guard.accept(_key(sender), rnd, seq)
    return guard


def _answer(header_kind: str, error: RemoteProtocolError, reply_to: int, rnd: int) -> object:
    if header_kind == "error":
        return "reset"
    return {"kind": "error", "code": error.code.value, "reply_to": reply_to, "round": rnd}


def _reconstruct(case: Case, opened: OpenedEnvelope, out: dict[str, Any]) -> None:
    """Peer-level (PROTOCOL.md 7): the state the receiver holds after this tensor message."""
    if "base" not in case or not isinstance(opened.message, TensorMessage):
        return
    base = {name: _tensor_from_json(entry) for name, entry in case["base"].items()}
    state = apply_delta(base, opened.message.tensors) if opened.message.is_delta else dict(opened.message.tensors)
    out["reconstructed"] = {name: _tensor_json(state[name]) for name in sorted(state)}
    out["reconstructed_state_digest"] = state_digest(state).hex()


def _run_envelope(case: Case) -> dict[str, Any]:
    shapes, dtypes, complete = _model(case)
    limits = Limits(**case.get("limits", {}))
    remote = case.get("remote")
    try:
        authenticated = authenticate_envelope(
            _bytes_of(case["input"]),
            trusted={_key(n) for n in case["trusted"]} if case.get("trusted") is not None else None,
            expected_sender=_key(remote) if remote else None,
            limits=limits,
        )
    except RemoteProtocolError as exc:
        return {"outcome": "refuse", "code": exc.code.value, "answer": "reset"}
    header = authenticated.header
    try:
        opened = open_authenticated(
            authenticated,
            identity=IDS_FROM_JSON[case["local"]],
            federation=case["federation"],
            replay=_guard(case),
            limits=limits,
            expected_shapes=shapes,
            expected_dtypes=dtypes,
            complete=complete,
            now_ms=case.get("now_ms"),
            max_skew_ms=case.get("max_skew_ms"),
        )
    except RemoteProtocolError as exc:
        answer = _answer(header.kind.value, exc, header.sequence, header.round)
        return {"outcome": "refuse", "code": exc.code.value, "answer": answer}
    out: dict[str, Any] = {"outcome": "accept", "message": summarize(opened)}
    key = IDS_FROM_JSON[case["local"]].shared_key(header.sender)
    out["payload"] = bytes(decrypt_in_place(bytearray(authenticated.ciphertext), key, header.nonce)).hex()
    _reconstruct(case, opened, out)
    return out


#: a secure-aggregation group of alice (the aggregator) with members bob and carol
SECAGG_MEMBERS = tuple(sorted((BOB.public_key, CAROL.public_key)))
SECAGG_DIGEST = bytes(range(32, 64))
#: the secure-aggregation cases draw nonces from their own ranges (appended cases change no others)
SECAGG_ENVELOPE_NONCES = 1 << 64
SECAGG_SESSION_NONCES = (1 << 64) + (1 << 32)
INT4_ENVELOPE_NONCES = (1 << 64) + (2 << 32)
TOPK_ENVELOPE_NONCES = (1 << 64) + (3 << 32)


def secagg_message(kind: str, routing: Mapping[str, Any]) -> Message:
    """A well-formed secure-aggregation message of ``kind`` (opaque bytes where the core would seal)."""
    m, d = SECAGG_MEMBERS, SECAGG_DIGEST
    builders: dict[str, Callable[[], Message]] = {
        "secagg-group": lambda: SecaggGroup(**routing, members=m, length=3, bits=32, scale=2.0**27, clip=8.0,
                                            max_members=2, threshold=2, weight_cap=64, signature=b"\x05" * 64),
        "secagg-deal": lambda: SecaggDeal(**routing, group_digest=d, self_digest=b"\x06" * 32,
                                          pair_digest=b"\x07" * 32, sealed=tuple((k, b"\x08" * 136) for k in m)),
        "secagg-shares": lambda: SecaggShares(**routing, group_digest=d, dealers=m,
                                              sealed=tuple((k, b"\x08" * 136) for k in m)),
        "secagg-masked": lambda: SecaggMasked.of(np.array([1, 2**31, 2**32 - 1], np.uint32), **routing,
                                                 group_digest=d, n_samples=40),
        "secagg-commit": lambda: SecaggCommit(**routing, group_digest=d, dealers=m, survivors=m[:1],
                                              signature=b"\x09" * 64),
        "secagg-release": lambda: SecaggRelease(**routing, group_digest=d, self_parts=((m[0], b"\x0a" * 32),),
                                                pair_parts=((m[1], b"\x0b" * 32),)),
    }
    return builders[kind]()


def _local_message(session: Session, kind: str, sequence: int) -> Message:
    """A message of ``kind`` that the local end sends in a prelude (its content is not checked)."""
    routing = {
        "federation": session.federation,
        "sender": session.identity.public_key,
        "recipient": session.peer,
        "round": 0,
        "sequence": sequence,
    }
    tensors = {"w": np.zeros(1, np.float32)}
    builders: dict[str, Callable[[], Message]] = {
        "hello": lambda: Hello(**routing),
        "update": lambda: Update(**routing, tensors=tensors, state_digest=state_digest(tensors)),
        "train-request": lambda: TrainRequest(**routing, tensors=tensors),
        "train-result": lambda: TrainResult(**routing, tensors=tensors, request_sequence=0),
        "need-base": lambda: NeedBase(**routing),
        "ack": lambda: Ack(**routing, reply_to=0),
        "error": lambda: ErrorMessage(**routing, code=ErrorCode.REFUSED),
    }
    if kind.startswith("secagg-"):
        return secagg_message(kind, routing)
    return builders[kind]()


def _run_session(case: Case) -> dict[str, Any]:
    shapes, dtypes, complete = _model(case)
    spec = case["session"]
    sequences = iter(range(1_000_000, 2_000_000))
    session = Session(
        Role(spec["role"]),
        identity=IDS_FROM_JSON[case["local"]],
        peer=_key(case["remote"]),
        federation=case["federation"],
        trusted={_key(n) for n in case["trusted"]} if case.get("trusted") is not None else None,
        replay=_guard(case),
        limits=Limits(**case.get("limits", {})),
        expected_shapes=shapes,
        expected_dtypes=dtypes,
        complete=complete,
        max_skew_ms=case.get("max_skew_ms"),
        clock_ms=lambda: int(case["now_ms"]),
        next_sequence=lambda: next(sequences),
    )
    for step in spec.get("prelude", []):
        if "send" in step:
            session.send(_local_message(session, step["send"], next(sequences)))
        else:
            session.receive_data(_bytes_of(step["receive"]))
            if not isinstance(session.next_event(), OpenedEnvelope):
                raise AssertionError(f"{case['name']}: a prelude frame was not accepted")
    if session.state.value != spec["state"]:
        raise AssertionError(f"{case['name']}: prelude led to {session.state.value}, not {spec['state']}")
    data = _bytes_of(case["input"])
    if data:  # b"" would mean the end of the stream
        session.receive_data(data)
    if case.get("eof"):
        session.receive_data(b"")
    try:
        while (event := session.next_event()) is NEED_DATA:
            raise AssertionError(f"{case['name']}: the input is not a whole frame")
    except RemoteProtocolError as exc:
        sealed = session.refusal(exc)
        answer: object = "reset"
        if sealed is not None:
            body = _sealed_body(sealed, session)
            answer = {
                "kind": sealed.header.kind.value,
                "code": body["code"],
                "reply_to": body["reply_to"],
                "round": sealed.header.round,
            }
        return {"outcome": "refuse", "code": exc.code.value, "answer": answer, "state_after": session.state.value}
    if event is CLOSED:
        return {"outcome": "end", "state_after": session.state.value}
    assert isinstance(event, OpenedEnvelope)
    out: dict[str, Any] = {"outcome": "accept", "message": summarize(event), "state_after": session.state.value}
    _reconstruct(case, event, out)
    return out


def _sealed_body(sealed: SealedEnvelope, session: Session) -> dict[str, Any]:
    """The body of an envelope the session sealed, decrypted with the remote's key."""
    remote = next(i for i in IDS_FROM_JSON.values() if i.public_key == session.peer)
    key = remote.shared_key(session.identity.public_key)
    payload = bytes(decrypt_in_place(bytearray(sealed.ciphertext), key, sealed.header.nonce))
    body: dict[str, Any] = msgpack.unpackb(payload[4 : 4 + int.from_bytes(payload[:4], "big")], raw=False)
    return body


def _run_announce(case: Case) -> dict[str, Any]:
    source = case.get("source")
    try:
        received = decode_announce(
            _bytes_of(case["input"]),
            federation=case["federation"],
            trusted={_key(n) for n in case["trusted"]} if case.get("trusted") is not None else None,
            me=_key(case["local"]),
            expected_sender=_key(source) if source else None,
            replay=_guard(case),
            now_ms=case.get("now_ms"),
            max_skew_ms=case.get("max_skew_ms"),
        )
    except RemoteProtocolError as exc:
        return {"outcome": "refuse", "code": exc.code.value}
    announce = received.announce
    fields = {
        "version": announce.version,
        "event": announce.event.value,
        "federation": announce.federation,
        "sender": announce.sender.hex(),
        "recipient": _jsonable(announce.recipient),
        "round": announce.round,
        "sequence": announce.sequence,
        "timestamp": received.timestamp,
        **{k: _jsonable(v) for k, v in announce.event_fields().items()},
    }
    return {"outcome": "accept", "announce": fields}


RUNNERS: dict[str, Callable[[Case], dict[str, Any]]] = {
    "envelope": _run_envelope,
    "session": _run_session,
    "announce": _run_announce,
}


def run_case(suite: Mapping[str, Any], case: Case) -> dict[str, Any]:
    """The reference implementation's outcome for ``case`` of ``suite`` (JSON only)."""
    _load_identities(suite["identities"])
    return RUNNERS[suite["mode"]](case)


def _brief(outcome: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an outcome a case is written with: its code and answer, or "accept"."""
    return {k: v for k, v in outcome.items() if k in ("outcome", "code", "answer", "state_after")}


# ---------------------------------------------------------------- building envelopes


class _Nonces:
    """Fixed, distinct nonces: 1, 2, 3, ... as 24-byte big-endian integers."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> bytes:
        self.n += 1
        return self.n.to_bytes(24, "big")


NONCE = _Nonces()


def routing(sender: Identity = ALICE, recipient: Identity = BOB, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "federation": FED,
        "sender": sender.public_key,
        "recipient": recipient.public_key,
        "round": 3,
        "sequence": 1,
    }
    return base | kw


def seal(message: Message, signer: Identity = ALICE, *, ts: int = NOW, nonce: bytes | None = None) -> bytes:
    """The envelope (a frame body) the reference seals, with a fixed nonce and timestamp."""
    return seal_envelope(message, signer, timestamp_ms=ts, nonce=nonce or NONCE()).to_bytes()


def frame(envelope: bytes) -> bytes:
    return len(envelope).to_bytes(4, "big") + envelope


def split(envelope: bytes) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """(header map, header bytes, signature, ciphertext) of an envelope."""
    n = int.from_bytes(envelope[:2], "big")
    header_bytes = envelope[2 : 2 + n]
    header: dict[str, Any] = msgpack.unpackb(header_bytes, raw=False)
    return header, header_bytes, envelope[2 + n : 2 + n + 64], envelope[2 + n + 64 :]


def forge(header: dict[str, Any] | bytes, ciphertext: bytes, signer: Identity | None = ALICE) -> bytes:
    """An envelope from parts, the header (a map, or raw msgpack) signed by ``signer``."""
    hb = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    signature = signer.sign(ENVELOPE_SIGNING_DOMAIN + hb) if signer else bytes(64)
    return len(hb).to_bytes(2, "big") + hb + signature + ciphertext


def resign(envelope: bytes, signer: Identity = ALICE, **changes: Any) -> bytes:
    """``envelope`` with header fields changed (``None`` deletes one) and signed again."""
    header, _, _, ct = split(envelope)
    for key, value in changes.items():
        if value is _DELETE:
            del header[key]
        else:
            header[key] = value
    return forge(header, ct, signer)


_DELETE = object()


def add_entry(packed_map: bytes, key: str, raw_value: bytes) -> bytes:
    """One more ``key: raw_value`` entry (raw msgpack bytes) in a packed map of < 15 entries."""
    if not 0x80 <= packed_map[0] < 0x8F:
        raise ValueError("only small (fixmap) maps")
    return bytes([packed_map[0] + 1]) + packed_map[1:] + msgpack.packb(key) + raw_value


def raw(
    body: object = None,
    blob: bytes = b"",
    *,
    kind: str = "ack",
    codec: str = "none",
    base: bytes | None = None,
    encrypt_to: Identity = BOB,
    body_bytes: bytes | None = None,
    payload: bytes | None = None,
    signer: Identity = ALICE,
    **header: Any,
) -> bytes:
    """An envelope from an independent encoder: msgpack, PyNaCl's Box and hashlib only."""
    if payload is None:
        packed = body_bytes if body_bytes is not None else msgpack.packb(body, use_bin_type=True)
        payload = struct.pack(">I", len(packed)) + packed + blob
    nonce = NONCE()
    ct = Box(ALICE.box_private_key, PublicKey(x25519_public_key(encrypt_to.public_key))).encrypt(payload, nonce)
    fields: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "kind": kind,
        "federation": FED,
        "sender": ALICE.public_key,
        "recipient": BOB.public_key,
        "round": 3,
        "sequence": 1,
        "timestamp": NOW,
        "base_digest": base,
        "payload_digest": hashlib.blake2b(ct.ciphertext, digest_size=32).digest(),
        "codec": codec,
        "nonce": nonce,
    }
    return forge(fields | header, ct.ciphertext, signer)


def update_raw(table: list[Any], blob: bytes, *, codec: str = "float32", **body: Any) -> bytes:
    """An ``update`` with this table and blob (body defaults: 1 sample, a digest, no metrics)."""
    fields: dict[str, Any] = {"n_samples": 1, "state_digest": DIGEST, "metrics": {}, "tensors": table}
    for key, value in body.items():
        if value is _DELETE:
            del fields[key]
        else:
            fields[key] = value
    return raw(fields, blob, kind="update", codec=codec)


def flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[position] ^= mask
    return bytes(out)


def received_digest(tensors: Mapping[str, np.ndarray], codec: str) -> bytes:
    """The state digest of a full snapshot as its receiver decodes it (PROTOCOL.md 7)."""
    return state_digest(_decoded(tensors, codec))


def snapshot(tensors: Mapping[str, np.ndarray], codec: str) -> bytes:
    """A full-snapshot ``update`` of ``tensors`` under ``codec``, naming the state its receiver decodes."""
    return seal(Update(**routing(), tensors=dict(tensors), codec=codec, state_digest=received_digest(tensors, codec)))


DIGEST = state_digest(STATE)
F32_W = [["w", "float32", [2], 0, None]], np.array([1.0, 2.0], "<f4").tobytes()


def ack(**kw: Any) -> bytes:
    return seal(Ack(**routing(**kw), reply_to=0, note="ok"))


def update(**kw: Any) -> bytes:
    kw.setdefault("state_digest", DIGEST)
    kw.setdefault("tensors", STATE)
    return seal(Update(**routing(**{k: kw.pop(k) for k in list(kw) if k in ("round", "sequence")}), **kw))


# ---------------------------------------------------------------- cases

ACCEPT = "accept"
Intended = str | tuple[str, str]
"""``"accept"``, ``"end"`` or ``(code, answer)`` with answer ``"reset"`` or ``"error"``."""


def _case(
    name: str, description: str, data: bytes | dict[str, Any], intended: Intended, **fields: Any
) -> tuple[Case, Intended]:
    case: Case = {
        "name": name,
        "description": description,
        "local": "bob",
        "remote": "alice",
        "trusted": ["alice"],
        "federation": FED,
        "now_ms": NOW,
        "max_skew_ms": SKEW,
    }
    for key, value in fields.items():
        if value is _DELETE:
            case.pop(key, None)
        else:
            case[key] = value
    case["input"] = data.hex() if isinstance(data, bytes) else data
    return case, intended


def _reset(code: str) -> tuple[str, str]:
    return code, "reset"


def _error(code: str) -> tuple[str, str]:
    return code, "error"


def envelope_cases() -> Iterator[tuple[Case, Intended]]:
    """Single envelopes opened outside a session (section 10 without step 5)."""
    c = _case
    # ---- the section 13 vectors, and one accepted envelope of every kind
    yield c("vector-ack", "section 13: the ack frame's envelope", seal(
        Ack(**routing(), reply_to=0, note="ok"), nonce=VECTOR_NONCE), ACCEPT)
    yield c("vector-update", "section 13: the update frame's envelope (full snapshot, float32)", seal(
        Update(**routing(sequence=2), tensors=STATE, n_samples=10, state_digest=DIGEST), nonce=VECTOR_NONCE), ACCEPT)
    yield c("hello", "a dialer's first hello: no base from the recipient yet", seal(Hello(**routing(round=0))), ACCEPT)
    yield c("hello-naming-a-base", "a hello naming the base its sender holds from the recipient", seal(Hello(
        **routing(), model="unet-2d", state_digest=DIGEST, codecs=("int8", "float32"), max_frame_size=4096)), ACCEPT)
    yield c("need-base-nil", "need-base with unknown_base = nil: send me your current full snapshot",
            seal(NeedBase(**routing())), ACCEPT)
    yield c("need-base-announced-digest", "need-base naming an announced state digest",
            seal(NeedBase(**routing(), unknown_base=DIGEST)), ACCEPT)
    yield c("error-message", "a peer-level error: STATE_MISMATCH, replying to sequence 7 of round 3", seal(
        ErrorMessage(**routing(), code=ErrorCode.STATE_MISMATCH, message="state digest differs", reply_to=7)), ACCEPT)
    yield c("train-request", "a train-request carrying a full snapshot", seal(
        TrainRequest(**routing(), tensors=STATE, epochs=2, deadline_ms=NOW + 60_000)), ACCEPT)
    yield c("train-result-delta", "a train-result: a delta against the request's model, with metrics", seal(
        TrainResult(**routing(), tensors=make_delta({k: v + 1 for k, v in STATE.items()}, STATE), base_digest=DIGEST,
                    request_sequence=9, n_samples=50, metrics={"loss": 0.25, "dice": 0.75})), ACCEPT)
    yield c("update-uint64-limits", "round, sequence and n_samples at 2^64-1 (uint64)", seal(Update(
        **routing(round=2**64 - 1, sequence=2**64 - 1), tensors=STATE, n_samples=2**64 - 1, state_digest=DIGEST)),
        ACCEPT)
    float32_body = msgpack.packb(
        {"n_samples": 1, "state_digest": DIGEST, "metrics": {"loss": 0.5}, "tensors": F32_W[0]},
        use_bin_type=True,
        use_single_float=True,
    )
    yield c("update-float32-metrics", "metrics written as msgpack float 32 are accepted (float 64 is what "
            "encoders write)", raw(body_bytes=float32_body, blob=F32_W[1], kind="update", codec="float32"), ACCEPT)
    yield c("update-metrics-integral-float", "an integral metric written as float 64 (3.0) is a float",
            update_raw(*F32_W, metrics={"degree": 3.0}), ACCEPT)
    scalars: dict[str, np.ndarray] = {
        "s": np.array(-2.5, np.float32),
        "z": np.zeros(4, np.float32),
        "zs": np.array(0.0, np.float32),
        "v": np.array([0.1, -0.2, 0.3], np.float32),
        "n": np.array(7, np.int64),
        "q": np.array([-128, 5, 127], np.int8),
        "m": np.array([True, False]),
    }
    yield c("update-int8-scalars-and-zeros", "int8 codec: a scalar, an all-zero tensor and an all-zero scalar "
            "(scale 0.0, bytes 00), a genuine int8 tensor (no scale), int64 and bool unchanged", seal(Update(
                **routing(), tensors=scalars, codec="int8", state_digest=received_digest(scalars, "int8"))), ACCEPT)
    yield c("update-int8-scalar-other-encoder", "an int8 scalar with scale 0.5 and q = 5 decodes to float32 2.5",
            update_raw([["s", "int8", [], 0, 0.5]], b"\x05", codec="int8"), ACCEPT)
    yield c("update-int8-tiny-values", "int8 codec: values whose scale would be below 2^-126 travel as zeros, scale 0",
            seal(Update(**routing(), tensors={"t": np.array([1e-39, 0.0, -5e-40], np.float32)}, codec="int8",
                        state_digest=received_digest({"t": np.array([1e-39, 0.0, -5e-40], np.float32)}, "int8"))),
            ACCEPT)
    yield c("update-float16-snapshot", "a float16 full snapshot: decoded tensors stay float16, and state_digest "
            "is over the float16 data", seal(Update(**routing(), tensors=STATE, codec="float16",
                                                    state_digest=received_digest(STATE, "float16"))), ACCEPT)
    yield c("update-empty-and-scalar", "a zero-size tensor (shape [0, 3]) and a bool scalar", seal(Update(
        **routing(), tensors={"e": np.zeros((0, 3), np.float32), "f": np.array(True)},
        state_digest=state_digest({"e": np.zeros((0, 3), np.float32), "f": np.array(True)}))), ACCEPT)
    # ---- peer level (section 7): what the receiver reconstructs from a delta, in its base's dtypes
    base16: dict[str, np.ndarray] = {
        "w": np.array([0.5, -1.0, 2.0], np.float16),
        "b": np.array([1, 2**63 - 1], np.int64),
    }
    new: dict[str, np.ndarray] = {"w": np.array([0.6, -1.1, 2.5], np.float32), "b": np.array([2, -(2**63)], np.int64)}
    delta = {"w": new["w"] - base16["w"].astype(np.float32), "b": make_delta(new, {**base16, "w": new["w"]})["b"]}
    decoded_delta = _decoded(delta, "int8")
    yield c("delta-int8-on-float16-base", "peer level: an int8-coded delta decodes to float32 and is applied in "
            "the base's dtypes: float16 for a float16 base (the delta rounded to float16, then a float16 addition), "
            "int64 with wrap-around; the update's state_digest names that result", seal(Update(
                **routing(), tensors=delta, base_digest=state_digest(base16), codec="int8",
                state_digest=state_digest(apply_delta(base16, decoded_delta)))), ACCEPT,
            base={k: _tensor_json(v) for k, v in sorted(base16.items())})
    # ---- refused before the signature: the stream is reset
    good_ack, good_update = ack(), update()
    yield c("too-large-envelope", "the envelope is longer than the receiver's frame limit (here 256 bytes)",
            good_update, _reset("TOO_LARGE"), limits={"max_frame_size": 256})
    yield c("too-large-header-len", "header_len 0xffff > 4096 (checked before the envelope's length against it)",
            b"\xff\xff" + good_ack[2:], _reset("TOO_LARGE"))
    yield c("bad-frame-under-87-bytes", "86 bytes: shorter than the smallest envelope", good_ack[:86],
            _reset("BAD_FRAME"))
    yield c("bad-frame-header-len-beyond-envelope", "header_len says more than the envelope holds",
            len(good_ack).to_bytes(2, "big") + good_ack[2:], _reset("BAD_FRAME"))
    header, hb, _, ct = split(good_ack)
    yield c("bad-msgpack-header-garbage", "the header is 0xc1 (never used) bytes", forge(b"\xc1" * 40, ct),
            _reset("BAD_MSGPACK"))
    yield c("bad-msgpack-duplicate-key", "the header repeats the key round", forge(
        add_entry(hb, "round", msgpack.packb(3)), ct), _reset("BAD_MSGPACK"))
    yield c("bad-msgpack-timestamp-extension", "an extra header key whose value is the timestamp extension (-1)",
            forge(add_entry(hb, "at", b"\xd6\xff\x00\x00\x00\x01"), ct), _reset("BAD_MSGPACK"))
    yield c("bad-msgpack-extension-5", "an extra header key whose value is a fixext 1 of type 5",
            forge(add_entry(hb, "x", b"\xd4\x05\x00"), ct), _reset("BAD_MSGPACK"))
    yield c("bad-msgpack-trailing-byte-in-header", "one byte (nil) after the header map, inside header_len",
            forge(hb + b"\xc0", ct), _reset("BAD_MSGPACK"))
    yield c("bad-msgpack-bin-key", "a map key that is bin, not str", forge(
        bytes([hb[0] + 1]) + hb[1:] + b"\xc4\x01k" + b"\x00", ct), _reset("BAD_MSGPACK"))
    yield c("bad-msgpack-invalid-utf8", "a str value that is not UTF-8", forge(
        add_entry(hb, "x", b"\xa2\xff\xfe"), ct), _reset("BAD_MSGPACK"))
    yield c("bad-msgpack-nesting-9", "an extra header value nested 8 arrays deep: depth 9 with the header map",
            forge(add_entry(hb, "x", b"\x91" * 8 + b"\x00"), ct), _reset("BAD_MSGPACK"))
    yield c("bad-type-nesting-8", "the same nested 7 arrays deep (depth 8) is valid msgpack: the extra key "
            "is BAD_TYPE", forge(add_entry(hb, "x", b"\x91" * 7 + b"\x00"), ct), _reset("BAD_TYPE"))
    yield c("bad-type-header-not-a-map", "the header is an array", forge(msgpack.packb([2, "ack"]), ct),
            _reset("BAD_TYPE"))
    for field, value, code, why in [
        ("version", "2", "BAD_TYPE", "version is a str"),
        ("version", _DELETE, "BAD_TYPE", "version is missing"),
        ("version", 1, "UNKNOWN_VERSION", "a version 1 envelope"),
        ("version", 3, "UNKNOWN_VERSION", "version 3"),
        ("version", -1, "UNKNOWN_VERSION", "a negative version is an integer other than 2"),
        ("kind", 7, "BAD_TYPE", "kind is an integer"),
        ("kind", "gossip", "UNKNOWN_KIND", "an unknown kind"),
        ("kind", "announce", "UNKNOWN_KIND", "announces never travel in envelopes"),
        ("nonce", _DELETE, "BAD_TYPE", "a missing key"),
        ("priority", 1, "BAD_TYPE", "an extra key"),
        ("round", -1, "BAD_TYPE", "a negative round"),
        ("round", True, "BAD_TYPE", "a bool where a uint is due"),
        ("sequence", 1.0, "BAD_TYPE", "a float where a uint is due"),
        ("sender", b"\x01" * 31, "BAD_TYPE", "a 31-byte sender"),
        ("federation", "a b", "BAD_TYPE", "a federation id with a space"),
        ("codec", "zstd", "BAD_TYPE", "an unknown codec"),
        ("codec", "float32", "BAD_TYPE", "a tensor codec on an ack"),
        ("base_digest", DIGEST, "BAD_TYPE", "a base digest on an ack"),
        ("timestamp", -5, "BAD_TYPE", "a negative timestamp"),
    ]:
        yield c(f"header-{field}-{code.lower()}-{str(value)[:8] if value is not _DELETE else 'missing'}".replace(
            " ", ""), f"header: {why}", resign(good_ack, **{field: value}), _reset(code))
    yield c("untrusted-sender", "the sender is not in the trusted list", good_ack, _reset("UNTRUSTED_SENDER"),
            trusted=["carol"])
    yield c("sender-mismatch", "a trusted sender, but not the stream's peer (carol)", good_ack,
            _reset("SENDER_MISMATCH"), trusted=["alice", "carol"], remote="carol")
    yield c("bad-signature-flipped-bit", "one bit of the signature flipped", flip(good_ack, 2 + len(hb) + 5),
            _reset("BAD_SIGNATURE"))
    yield c("bad-signature-other-signer", "the header signed by carol, naming alice as sender",
            forge(header, ct, CAROL), _reset("BAD_SIGNATURE"))
    changed = msgpack.packb(header | {"round": 4}, use_bin_type=True)
    yield c("bad-signature-header-changed", "round changed after signing (the original signature kept)",
            len(changed).to_bytes(2, "big") + changed + split(good_ack)[2] + ct, _reset("BAD_SIGNATURE"))
    # ---- refused after the signature: answered with a signed error
    yield c("wrong-recipient", "addressed to carol", seal(Ack(**routing(recipient=CAROL), reply_to=0)),
            _error("WRONG_RECIPIENT"))
    yield c("wrong-federation", "another federation", ack(federation="other-fed"), _error("WRONG_FEDERATION"))
    yield c("stale", "timestamp 15 minutes and 1 ms before the receiver's clock", seal(
        Ack(**routing(), reply_to=0), ts=NOW - SKEW - 1), _error("STALE"))
    yield c("skew-boundary-accepted", "timestamp exactly 15 minutes after the receiver's clock", seal(
        Ack(**routing(), reply_to=0), ts=NOW + SKEW), ACCEPT)
    yield c("skew-check-disabled", "no skew configured: any timestamp", seal(Ack(**routing(), reply_to=0), ts=0),
            ACCEPT, max_skew_ms=None)
    yield c("digest-mismatch", "the last ciphertext byte flipped", flip(good_update, len(good_update) - 1, 0x80),
            _error("DIGEST_MISMATCH"))
    yield c("replay", "(alice, 3, 1) was accepted before", good_ack, _error("REPLAY"), replay_seen=[["alice", 3, 1]])
    yield c("replay-below-low-water-mark", "alice's low-water mark is (3, 2), e.g. restored after a restart",
            good_ack, _error("REPLAY"), replay_low_water_marks=[["alice", 3, 2]])
    yield c("replay-at-low-water-mark", "alice's low-water mark is (3, 1): (3, 1) itself is new", good_ack,
            ACCEPT, replay_low_water_marks=[["alice", 3, 1]])
    yield c("decrypt-failed", "encrypted to carol's key", raw({"reply_to": 0, "note": ""}, encrypt_to=CAROL),
            _error("DECRYPT_FAILED"))
    yield c("too-large-body", "body_len above the receiver's body limit (here 100 bytes)",
            raw({"reply_to": 0, "note": "x" * 200}), _error("TOO_LARGE"), limits={"max_body_size": 100})
    yield c("bad-frame-body-len-beyond-payload", "body_len 10 bytes more than the payload holds",
            raw(payload=struct.pack(">I", 22) + msgpack.packb({"reply_to": 0, "note": ""})), _error("BAD_FRAME"))
    yield c("bad-frame-trailing-blob", "an ack whose payload has bytes after its body", raw(
        {"reply_to": 0, "note": ""}, b"extra"), _error("BAD_FRAME"))
    yield c("bad-msgpack-body-garbage", "the body is 0xc1 0xc1", raw(body_bytes=b"\xc1\xc1"), _error("BAD_MSGPACK"))
    yield c("bad-msgpack-body-trailing-byte", "a byte after the body map, inside body_len",
            raw(body_bytes=msgpack.packb({"reply_to": 0, "note": ""}) + b"\x00"), _error("BAD_MSGPACK"))
    yield c("bad-msgpack-body-timestamp", "note is a timestamp extension",
            raw(body_bytes=add_entry(msgpack.packb({"reply_to": 0}), "note", b"\xd6\xff\x00\x00\x00\x01")),
            _error("BAD_MSGPACK"))
    yield c("bad-type-body-missing-key", "an ack without note", raw({"reply_to": 0}), _error("BAD_TYPE"))
    yield c("bad-type-update-without-state-digest", "an update whose state_digest is nil",
            update_raw(*F32_W, state_digest=None), _error("BAD_TYPE"))
    yield c("bad-type-integer-metric", "a metric written as the integer 3 instead of the float 3.0",
            update_raw(*F32_W, metrics={"degree": 3}), _error("BAD_TYPE"))
    yield c("bad-type-nan-metric", "a NaN metric", update_raw(*F32_W, metrics={"loss": float("nan")}),
            _error("BAD_TYPE"))
    yield c("bad-type-unknown-error-code", "an error whose code is not a code of section 10 (a refused error "
            "is never answered)", raw({"code": "FROBNICATED", "message": "", "reply_to": None}, kind="error"),
            _reset("BAD_TYPE"))
    yield c("bad-type-update-without-tensors", "an update body without tensors", update_raw(
        *F32_W, tensors=_DELETE), _error("BAD_TYPE"))
    yield c("too-large-note", "a note of 1025 bytes", raw({"reply_to": 0, "note": "n" * 1025}), _error("TOO_LARGE"))
    yield c("too-large-metric-name", "a metric name of 129 bytes", update_raw(*F32_W, metrics={"m" * 129: 0.5}),
            _error("TOO_LARGE"))
    nan32 = np.array([1.0, np.nan], "<f4").tobytes()
    yield c("non-finite-float32", "a NaN in a float32 tensor", update_raw([["w", "float32", [2], 0, None]], nan32),
            _error("NON_FINITE"))
    yield c("non-finite-float16", "an infinity in a float16 tensor", update_raw(
        [["w", "float16", [1], 0, None]], b"\x00\x7c", codec="float16"), _error("NON_FINITE"))
    yield c("bad-shape-model", "w has shape [2], the model's is [3]", update_raw(*F32_W), _error("BAD_SHAPE"),
            model={"shapes": {"w": [3]}})
    yield c("bad-shape-negative-dimension", "a shape with -1", update_raw([["w", "float32", [-1], 0, None]], b""),
            _error("BAD_SHAPE"))
    yield c("bad-shape-nine-dimensions", "nine dimensions", update_raw([["w", "float32", [1] * 9, 0, None]],
                                                                        bytes(4)), _error("BAD_SHAPE"))
    yield c("too-large-elements", "3 elements in one tensor, the limit here is 2", update_raw(
        [["w", "float32", [3], 0, None]], bytes(12)), _error("TOO_LARGE"), limits={"max_tensor_elements": 2})
    yield c("too-large-tensor-name", "a tensor name of 257 bytes", update_raw(
        [["n" * 257, "float32", [1], 0, None]], bytes(4)), _error("TOO_LARGE"))
    yield c("bad-dtype-float64", "float64 is not a wire dtype", update_raw([["w", "float64", [1], 0, None]],
                                                                           bytes(8)), _error("BAD_DTYPE"))
    yield c("bad-dtype-float32-under-int8", "a float32 entry under the int8 codec", update_raw(
        *F32_W, codec="int8"), _error("BAD_DTYPE"))
    yield c("bad-dtype-bool-byte", "a bool byte 0x02", update_raw([["m", "bool", [2], 0, None]], b"\x01\x02"),
            _error("BAD_DTYPE"))
    yield c("bad-dtype-model", "a float32 tensor where the model's is int64", update_raw(*F32_W),
            _error("BAD_DTYPE"), model={"shapes": {"w": [2]}, "dtypes": {"w": "int64"}})
    yield c("bad-dtype-model-genuine-int8", "a genuine int8 tensor (no scale) for a float32 model tensor",
            update_raw([["w", "int8", [2], 0, None]], b"\x01\x02", codec="int8"), _error("BAD_DTYPE"),
            model={"shapes": {"w": [2]}, "dtypes": {"w": "float32"}})
    yield c("model-dtype-int8-coded-float", "an int8-coded tensor (with a scale) fits a float32 model tensor",
            update_raw([["w", "int8", [2], 0, 0.5]], b"\x01\x02", codec="int8"), ACCEPT,
            model={"shapes": {"w": [2]}, "dtypes": {"w": "float32"}})
    two = [["a", "float32", [1], 0, None], ["b", "float32", [1], 4, None]]
    for name, table, blob, why in [
        ("overlap", [two[0], ["b", "float32", [1], 2, None]], bytes(8), "b starts inside a"),
        ("gap", [two[0], ["b", "float32", [1], 6, None]], bytes(10), "b starts 2 bytes after a ends"),
        ("unsorted", [[*two[1][:3], 0, None], ["a", "float32", [1], 4, None]], bytes(8), "b before a"),
        ("duplicate", [two[0], ["a", "float32", [1], 4, None]], bytes(8), "a twice"),
        ("trailing-bytes", two, bytes(9), "one byte after the last tensor"),
        ("overrun", two, bytes(7), "b runs past the blob"),
        ("scale-on-float32", [["w", "float32", [1], 0, 0.5]], bytes(4), "a scale on a float32 entry"),
        ("integer-scale", [["w", "int8", [1], 0, 1]], bytes(1), "the scale is the integer 1, not a float"),
        ("five-elements", [["w", "float32", [1], 0]], bytes(4), "an entry of 4 elements"),
    ]:
        codec = "int8" if "scale" in name and "float32" not in name else "float32"
        yield c(f"bad-table-{name}", f"table: {why}", update_raw(table, blob, codec=codec), _error("BAD_TABLE"))
    yield c("bad-table-unknown-model-tensor", "a tensor the model does not have", update_raw(*F32_W),
            _error("BAD_TABLE"), model={"shapes": {"v": [2]}})
    yield c("bad-table-missing-model-tensor", "complete states required: the model's v is missing",
            update_raw(*F32_W), _error("BAD_TABLE"), model={"shapes": {"v": [2], "w": [2]}, "complete": True})
    # ---- two failures at once: the order of section 10 decides the code
    yield c("order-version-before-key-set", "version 1 and an extra key", resign(good_ack, version=1, extra=0),
            _reset("UNKNOWN_VERSION"))
    yield c("order-version-before-kind", "version missing and an unknown kind",
            resign(good_ack, version=_DELETE, kind="gossip"), _reset("BAD_TYPE"))
    yield c("order-kind-before-key-set", "an unknown kind and a missing key",
            resign(good_ack, kind="gossip", nonce=_DELETE), _reset("UNKNOWN_KIND"))
    yield c("order-header-fields-before-trust", "a bad round from an untrusted sender", resign(good_ack, round=-1),
            _reset("BAD_TYPE"), trusted=["carol"])
    yield c("order-trust-before-signature", "untrusted and a bad signature", flip(good_ack, 2 + len(hb) + 5),
            _reset("UNTRUSTED_SENDER"), trusted=["carol"])
    yield c("order-sender-mismatch-before-signature", "not the stream's peer and a bad signature",
            flip(good_ack, 2 + len(hb) + 5), _reset("SENDER_MISMATCH"), trusted=["alice", "carol"], remote="carol")
    yield c("order-signature-before-recipient", "a bad signature on an envelope for carol",
            flip(seal(Ack(**routing(recipient=CAROL), reply_to=0)), 2 + len(hb) + 5), _reset("BAD_SIGNATURE"))
    yield c("order-recipient-before-federation", "for carol, in another federation", seal(
        Ack(**routing(recipient=CAROL, federation="other-fed"), reply_to=0)), _error("WRONG_RECIPIENT"))
    yield c("order-federation-before-timestamp", "another federation, stale", seal(
        Ack(**routing(federation="other-fed"), reply_to=0), ts=1), _error("WRONG_FEDERATION"))
    yield c("order-timestamp-before-digest", "stale, and the ciphertext altered",
            flip(seal(Ack(**routing(), reply_to=0), ts=1), -1), _error("STALE"))
    yield c("order-digest-before-replay", "the ciphertext altered, and (3, 1) seen before",
            flip(good_ack, len(good_ack) - 1), _error("DIGEST_MISMATCH"), replay_seen=[["alice", 3, 1]])
    yield c("order-replay-before-decryption", "seen before, and encrypted to carol",
            raw({"reply_to": 0, "note": ""}, encrypt_to=CAROL), _error("REPLAY"), replay_seen=[["alice", 3, 1]])
    yield c("order-body-key-set-before-table", "an update without metrics and with a float64 tensor",
            update_raw([["a", "float64", [1], 0, None]], bytes(8), metrics=_DELETE), _error("BAD_TYPE"))
    yield c("order-body-key-set-before-blob", "an ack without note and with a non-empty blob",
            raw({"reply_to": 0}, b"extra"), _error("BAD_TYPE"))
    yield c("order-table-before-body-fields", "a float64 tensor and n_samples = -1",
            update_raw([["a", "float64", [1], 0, None]], bytes(8), n_samples=-1), _error("BAD_DTYPE"))
    yield c("order-body-fields-in-table-order", "a hello whose agent is too long and whose codecs are unknown",
            raw({"agent": "a" * 129, "model": "", "state_digest": None, "codecs": ["zstd"],
                 "max_frame_size": 1024}, kind="hello"), _error("TOO_LARGE"))
    yield c("order-metric-name-before-value", "a 129-byte metric name whose value is an integer",
            update_raw(*F32_W, metrics={"m" * 129: 3}), _error("TOO_LARGE"))
    yield c("order-name-before-dtype", "names out of order, the second entry's dtype float64",
            update_raw([["b", "float32", [1], 0, None], ["a", "float64", [1], 4, None]], bytes(12)),
            _error("BAD_TABLE"))
    yield c("order-dtype-before-scale", "a float64 entry with an integer scale",
            update_raw([["a", "float64", [1], 0, 1]], bytes(8)), _error("BAD_DTYPE"))
    yield c("order-shape-before-offset", "a negative dimension and a wrong offset",
            update_raw([["a", "float32", [-1], 3, None]], bytes(4)), _error("BAD_SHAPE"))
    yield c("order-model-shape-before-model-dtype", "the model's shape and dtype both differ",
            update_raw(*F32_W), _error("BAD_SHAPE"), model={"shapes": {"w": [3]}, "dtypes": {"w": "int64"}})
    yield c("order-entries-in-order", "the first tensor holds a NaN, the second overlaps it",
            update_raw([["a", "float32", [1], 0, None], ["b", "float32", [1], 0, None]],
                       np.array([np.nan], "<f4").tobytes() + bytes(4)), _error("NON_FINITE"))
    yield c("order-entries-before-trailing-bytes", "a bool byte 0x02, and trailing bytes",
            update_raw([["m", "bool", [1], 0, None]], b"\x02\x00"), _error("BAD_DTYPE"))
    # ---- secure aggregation (PROTOCOL.md section 9a): one accepted envelope of each kind, and refusals
    saved, NONCE.n = NONCE.n, SECAGG_ENVELOPE_NONCES  # the cases above keep their bytes
    for kind in ("secagg-group", "secagg-deal", "secagg-shares", "secagg-masked", "secagg-commit",
                 "secagg-release"):
        yield c(kind, f"a well-formed {kind}", seal(secagg_message(kind, routing())), ACCEPT)
    yield c("secagg-masked-ignores-model-shapes", "a masked ring vector is not held to the model's tensors",
            seal(secagg_message("secagg-masked", routing())), ACCEPT, model={"shapes": {"w": [2]}, "complete": True})
    masked_body = {"group_digest": SECAGG_DIGEST, "n_samples": 1}
    yield c("secagg-masked-float", "secagg-masked carrying a float32 tensor, not the int32 ring", raw(
        {**masked_body, "tensors": [["masked", "float32", [2], 0, None]]}, np.zeros(2, "<f4").tobytes(),
        kind="secagg-masked", codec="float32"), _error("BAD_TYPE"))
    yield c("secagg-masked-two-tensors", "secagg-masked with a second tensor", raw(
        {**masked_body, "tensors": [["masked", "int32", [1], 0, None], ["x", "int32", [1], 4, None]]}, bytes(8),
        kind="secagg-masked", codec="float32"), _error("BAD_TYPE"))
    group_body = secagg_message("secagg-group", routing()).body()
    yield c("secagg-group-unsorted-members", "the members in descending order", raw(
        {**group_body, "members": list(reversed(SECAGG_MEMBERS))}, kind="secagg-group"), _error("BAD_TYPE"))
    yield c("secagg-release-both-kinds", "a release holding both kinds of share of one member", raw(
        {"group_digest": SECAGG_DIGEST, "self_parts": [[SECAGG_MEMBERS[0], b"\x0a"]],
         "pair_parts": [[SECAGG_MEMBERS[0], b"\x0b"]]}, kind="secagg-release"), _error("BAD_TYPE"))
    NONCE.n = saved
    # ---- the int4 codec (PROTOCOL.md section 6), added later: nonces of its own
    saved, NONCE.n = NONCE.n, INT4_ENVELOPE_NONCES
    int4_state: dict[str, np.ndarray] = {
        "v": np.array([-1.0, 0.0, 1.0], np.float32),
        "s": np.array(2.5, np.float32),
        "z": np.zeros(4, np.float32),
        "n": np.array(7, np.int64),
    }
    yield c("update-int4-worked-example", "int4 codec (PROTOCOL.md section 6): v = [-1, 0, 1] is scale 1/7 and the "
            "bytes 81 0f, the scalar 2.5 one byte 0f, four zeros scale 0.0 and the bytes 88 88; int64 unchanged",
            snapshot(int4_state, "int4"), ACCEPT)
    yield c("bad-dtype-int4-nibble-zero", "an int4 value held as nibble 0 (q + 8 is 1..15)",
            update_raw([["w", "int4", [2], 0, 0.5]], b"\x80", codec="int4"), _error("BAD_DTYPE"))
    yield c("bad-dtype-int4-unused-nibble", "an odd int4 count whose unused high nibble is not 0",
            update_raw([["w", "int4", [1], 0, 0.5]], b"\x18", codec="int4"), _error("BAD_DTYPE"))
    yield c("bad-dtype-int4-under-float32", "an int4 entry under the float32 codec",
            update_raw([["w", "int4", [2], 0, 0.5]], b"\x88"), _error("BAD_DTYPE"))
    yield c("bad-table-int4-without-scale", "an int4 entry without a scale",
            update_raw([["w", "int4", [2], 0, None]], b"\x88", codec="int4"), _error("BAD_TABLE"))
    yield c("bad-table-int4-overrun", "three int4 values need two bytes, the blob has one",
            update_raw([["w", "int4", [3], 0, 0.5]], b"\x88", codec="int4"), _error("BAD_TABLE"))
    NONCE.n = saved
    # ---- the topk codec (PROTOCOL.md section 6), added later: nonces of its own
    saved, NONCE.n = NONCE.n, TOPK_ENVELOPE_NONCES
    topk_state: dict[str, np.ndarray] = {
        "v": np.array([[0.0, -1.5], [0.0, 2.0]], np.float32),
        "z": np.zeros(3, np.float32),
        "n": np.array(7, np.int64),
    }
    yield c("update-topk-worked-example", "topk codec (PROTOCOL.md section 6): v = [[0, -1.5], [0, 2]] is k = 2, "
            "indices 1 and 3 then the values -1.5 and 2.0; three zeros k = 0 and no bytes; int64 unchanged",
            snapshot(topk_state, "topk"), ACCEPT)
    one = struct.pack("<If", 1, 0.5)
    yield c("bad-dtype-topk-under-float32", "a topk entry under the float32 codec",
            update_raw([["w", "topk", [2], 0, 1]], one), _error("BAD_DTYPE"))
    yield c("bad-table-topk-float-k", "a topk entry whose k is a float",
            update_raw([["w", "topk", [2], 0, 1.0]], one, codec="topk"), _error("BAD_TABLE"))
    yield c("bad-table-topk-k-above-count", "a topk entry holding three values of a two-value tensor",
            update_raw([["w", "topk", [2], 0, 3]], one * 3, codec="topk"), _error("BAD_TABLE"))
    yield c("bad-table-topk-overrun", "two topk values need 16 bytes, the blob has 8",
            update_raw([["w", "topk", [2], 0, 2]], one, codec="topk"), _error("BAD_TABLE"))
    yield c("bad-table-topk-index-out-of-range", "a topk index equal to the tensor's count",
            update_raw([["w", "topk", [2], 0, 1]], struct.pack("<If", 2, 0.5), codec="topk"), _error("BAD_TABLE"))
    yield c("bad-table-topk-indices-not-increasing", "topk indices 1 then 1",
            update_raw([["w", "topk", [3], 0, 2]], struct.pack("<2I2f", 1, 1, 0.5, 0.5), codec="topk"),
            _error("BAD_TABLE"))
    yield c("bad-non-finite-topk-value", "a topk value that is NaN",
            update_raw([["w", "topk", [2], 0, 1]], struct.pack("<If", 1, float("nan")), codec="topk"),
            _error("NON_FINITE"))
    yield c("bad-type-topk-secagg-masked", "codec topk on a secagg-masked envelope (model kinds only)", raw(
        {"group_digest": SECAGG_DIGEST, "n_samples": 1, "tensors": [["masked", "int32", [1], 0, None]]}, bytes(4),
        kind="secagg-masked", codec="topk"), _reset("BAD_TYPE"))
    # peer level (section 7): a topk delta is applied like any other, values not held adding 0
    base32: dict[str, np.ndarray] = {"w": np.array([0.5, -1.0, 2.0, 4.0], np.float32), "b": np.array([1, 5], np.int64)}
    sparse = {"w": np.array([0.0, 0.0, 0.25, 0.0], np.float32), "b": np.array([0, -7], np.int64)}
    yield c("delta-topk-on-float32-base", "peer level: a topk delta (w: k = 1, index 2, value 0.25) is added to its "
            "base, the values it does not hold unchanged (w = [0.5, -1, 2.25, 4]); b: an int64 delta; the update's "
            "state_digest names the result", seal(Update(
                **routing(), tensors=sparse, base_digest=state_digest(base32), codec="topk",
                state_digest=state_digest(apply_delta(base32, sparse)))), ACCEPT,
            base={k: _tensor_json(v) for k, v in sorted(base32.items())})
    NONCE.n = saved


def _decoded(tensors: Mapping[str, np.ndarray], codec: str) -> dict[str, np.ndarray]:
    """Tensors as a receiver decodes them after ``codec``."""
    sealed = seal_envelope(
        Update(**routing(), tensors=tensors, codec=codec, state_digest=bytes(32)), ALICE, nonce=bytes(24)
    )
    opened = open_authenticated(authenticate_envelope(sealed.to_bytes(), trusted=None), identity=BOB, federation=FED)
    assert isinstance(opened.message, Update)
    return dict(opened.message.tensors)


def _alice_hello(**kw: Any) -> bytes:
    return frame(seal(Hello(**routing(round=0, sequence=100, **kw))))


def _preludes() -> dict[tuple[str, str], list[dict[str, str]]]:
    """How the local end (bob) reaches each state with alice; frames alice sent are hex."""
    ready_listener = [{"receive": _alice_hello().hex()}, {"send": "hello"}]
    ready_dialer = [{"send": "hello"}, {"receive": _alice_hello().hex()}]
    return {
        ("listener", "IDLE"): [],
        ("listener", "HELLO_SENT"): [{"receive": _alice_hello().hex()}],
        ("listener", "READY"): ready_listener,
        ("dialer", "HELLO_SENT"): [{"send": "hello"}],
        ("dialer", "READY"): ready_dialer,
        ("dialer", "AWAIT_UPDATE_REPLY"): [*ready_dialer, {"send": "update"}],
        ("dialer", "AWAIT_BASE_REPLY"): [*ready_dialer, {"send": "need-base"}],
        ("dialer", "AWAIT_DEAL_REPLY"): [*ready_dialer, {"send": "secagg-group"}],
        ("dialer", "AWAIT_MASKED_REPLY"): [*ready_dialer, {"send": "secagg-shares"}],
        ("dialer", "AWAIT_RELEASE_REPLY"): [*ready_dialer, {"send": "secagg-commit"}],
    }


def session_cases() -> Iterator[tuple[Case, Intended]]:
    """Frames fed to a session in a given state (section 9, and step 5 of section 10)."""
    preludes = _preludes()

    def c(name: str, description: str, role: str, state: str, data: bytes, intended: Intended,
          **fields: Any) -> tuple[Case, Intended]:
        session = {"role": role, "state": state, "prelude": preludes[(role, state)]}
        return _case(name, description, data, intended, session=session, **fields)

    hello = Hello(**routing(round=0, sequence=1))
    yield c("hello-in-idle", "the dialer's hello: the listener is then HELLO_SENT", "listener", "IDLE",
            frame(seal(hello)), ACCEPT)
    yield c("update-in-ready", "an update from the dialer: AWAIT_UPDATE_REPLY", "listener", "READY",
            frame(update()), ACCEPT)
    yield c("need-base-nil-in-ready", "a newcomer asks for the current full snapshot (model layout)",
            "listener", "READY", frame(seal(NeedBase(**routing()))), ACCEPT)
    yield c("need-base-announced-in-ready", "fetching an announced state: unknown_base = the announced digest",
            "listener", "READY", frame(seal(NeedBase(**routing(), unknown_base=DIGEST))), ACCEPT)
    yield c("dialer-error-in-ready", "the dialer's error in READY closes the session", "listener", "READY",
            frame(seal(ErrorMessage(**routing(), code=ErrorCode.DIGEST_MISMATCH, reply_to=4))), ACCEPT)
    yield c("listener-hello", "the listener's hello: READY", "dialer", "HELLO_SENT",
            frame(seal(Hello(**routing(round=0), state_digest=DIGEST))), ACCEPT)
    yield c("listener-error-refuses-hello", "the listener refuses the hello with a signed error: CLOSED",
            "dialer", "HELLO_SENT", frame(seal(ErrorMessage(**routing(round=0), code=ErrorCode.STALE, reply_to=1))),
            ACCEPT)
    yield c("ack-answers-update", "an ack of the dialer's update, with the update's round: READY",
            "dialer", "AWAIT_UPDATE_REPLY", frame(ack(round=0)), ACCEPT)
    yield c("bad-round-answers-update", "a peer-level refusal (BAD_ROUND) is a normal reply: READY",
            "dialer", "AWAIT_UPDATE_REPLY", frame(seal(ErrorMessage(
                **routing(round=0), code=ErrorCode.BAD_ROUND, message="round 0 is outside 5..9", reply_to=1))),
            ACCEPT)
    yield c("need-base-answers-update", "the listener lacks the delta's base: need-base, READY",
            "dialer", "AWAIT_UPDATE_REPLY", frame(seal(NeedBase(**routing(round=0), unknown_base=DIGEST,
                                                                 reply_to=1))), ACCEPT)
    yield c("snapshot-answers-need-base", "the full snapshot answering need-base: READY", "dialer",
            "AWAIT_BASE_REPLY", frame(update()), ACCEPT)
    yield c("clean-end-in-ready", "the stream ends in READY: CLOSED", "listener", "READY", b"", "end", eof=True)
    yield c("end-while-awaiting-a-reply", "the stream ends while the dialer awaits its reply", "dialer",
            "AWAIT_UPDATE_REPLY", b"", _reset("UNEXPECTED_EOF"), eof=True)
    yield c("too-large-handshake-frame", "a 65 537-byte frame before READY: refused at its length prefix",
            "listener", "IDLE", (65537).to_bytes(4, "big") + b"\x00" * 16, _reset("TOO_LARGE"))
    yield c("too-large-frame-when-ready", "a 5000-byte frame over the configured 4096", "listener", "READY",
            (5000).to_bytes(4, "big") + b"\x00" * 16, _reset("TOO_LARGE"), limits={"max_frame_size": 4096})
    yield c("bad-frame-stream-ends-inside-a-frame", "half a frame, then the end of the stream", "listener",
            "IDLE", frame(seal(hello))[:50], _reset("BAD_FRAME"), eof=True)
    yield c("unexpected-ack-from-dialer", "a dialer never sends an ack: signed, so answered", "listener",
            "READY", frame(ack()), _error("UNEXPECTED_MESSAGE"))
    yield c("unexpected-update-before-hello", "an update as the dialer's first message", "listener", "IDLE",
            frame(update()), _error("UNEXPECTED_MESSAGE"))
    yield c("unexpected-second-hello", "a second hello from the listener", "dialer", "READY",
            frame(seal(Hello(**routing()))), _error("UNEXPECTED_MESSAGE"))
    good = ack()
    n = int.from_bytes(good[:2], "big")
    yield c("order-signature-before-session-state", "an unexpected ack whose signature is broken", "listener",
            "READY", frame(flip(good, 2 + n + 5)), _reset("BAD_SIGNATURE"))
    yield c("order-trust-before-session-state", "an ack (unexpected in IDLE) from an untrusted sender",
            "listener", "IDLE", frame(good), _reset("UNTRUSTED_SENDER"), trusted=["carol"])
    yield c("order-session-state-before-federation", "an unexpected ack in another federation", "listener",
            "READY", frame(ack(federation="other-fed")), _error("UNEXPECTED_MESSAGE"))
    yield c("sender-mismatch", "carol's hello on alice's stream (both trusted)", "listener", "IDLE",
            frame(seal(Hello(**routing(sender=CAROL, round=0)), CAROL)), _reset("SENDER_MISMATCH"),
            trusted=["alice", "carol"])
    yield c("stale-hello", "a hello 16 minutes old: answered, and the session is CLOSED", "listener", "IDLE",
            frame(seal(Hello(**routing(round=2, sequence=9)), ts=NOW - 960_000)), _error("STALE"))
    yield c("wrong-recipient-hello", "a hello for carol: the sender is authentic, so it is told", "listener",
            "IDLE", frame(seal(Hello(**routing(recipient=CAROL, round=0)))), _error("WRONG_RECIPIENT"))
    yield c("refused-error-not-answered", "the listener's error is stale: refused, never answered", "dialer",
            "HELLO_SENT", frame(seal(ErrorMessage(**routing(round=0), code=ErrorCode.REFUSED), ts=1)),
            _reset("STALE"))
    yield c("bad-shape-update", "an update of round 7 whose w is not the model's shape: the error carries "
            "round 7 and reply_to 5", "listener", "READY", frame(update(round=7, sequence=5)),
            _error("BAD_SHAPE"), model={"shapes": {"w": [4], "b": [2]}})
    yield c("bad-dtype-update", "an update whose b (int64) is float32 in the model", "listener", "READY",
            frame(update()), _error("BAD_DTYPE"), model={"shapes": {"w": [3], "b": [2]},
                                                         "dtypes": {"w": "float32", "b": "float32"}})
    yield c("model-dtypes-accepted", "an int8-coded update for a float32 model tensor, int64 as int64",
            "listener", "READY", frame(update(codec="int8", state_digest=received_digest(STATE, "int8"))),
            ACCEPT, model={"shapes": {"w": [3], "b": [2]}, "dtypes": {"w": "float32", "b": "int64"}})
    yield c("replay-of-the-hello-slot", "an update reusing the hello's (round 0, sequence 100)", "listener",
            "READY", frame(update(round=0, sequence=100)), _error("REPLAY"))
    # ---- secure aggregation (PROTOCOL.md section 9a)
    saved, NONCE.n = NONCE.n, SECAGG_SESSION_NONCES  # the cases above keep their bytes
    for kind, after in (("secagg-group", "AWAIT_DEAL_REPLY"), ("secagg-shares", "AWAIT_MASKED_REPLY"),
                        ("secagg-commit", "AWAIT_RELEASE_REPLY")):
        yield c(f"{kind}-in-ready", f"the aggregator's {kind}: {after}", "listener", "READY",
                frame(seal(secagg_message(kind, routing()))), ACCEPT)
    for kind, state in (("secagg-deal", "AWAIT_DEAL_REPLY"), ("secagg-masked", "AWAIT_MASKED_REPLY"),
                        ("secagg-release", "AWAIT_RELEASE_REPLY")):
        yield c(f"{kind}-answers-request", f"the member's {kind}: READY", "dialer", state,
                frame(seal(secagg_message(kind, routing(round=0)))), ACCEPT)
    yield c("secagg-deal-answers-shares", "a deal where the masked vector is due", "dialer", "AWAIT_MASKED_REPLY",
            frame(seal(secagg_message("secagg-deal", routing(round=0)))), _error("UNEXPECTED_MESSAGE"))
    yield c("secagg-masked-from-dialer", "a masked vector sent by the dialer (only members, listening, send one)",
            "listener", "READY", frame(seal(secagg_message("secagg-masked", routing()))),
            _error("UNEXPECTED_MESSAGE"))
    NONCE.n = saved


def announce_cases() -> Iterator[tuple[Case, Intended]]:
    """Announces received from GossipSub (section 8)."""
    c = _case

    def body_of(data: bytes) -> dict[str, Any]:
        decoded: dict[str, Any] = msgpack.unpackb(data[64:], raw=False)
        return decoded

    def signed(body: dict[str, Any] | bytes, signer: Identity = ALICE) -> bytes:
        packed = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
        return signer.sign(ANNOUNCE_SIGNING_DOMAIN + packed) + packed

    common: dict[str, Any] = {"federation": FED, "sender": ALICE.public_key, "round": 3}
    vector = encode_announce(
        UpdateAvailable(**common, sequence=3, digest=DIGEST, size=sum(a.nbytes for a in STATE.values())),
        ALICE,
        timestamp_ms=NOW,
    )
    good = body_of(vector)
    fields: dict[str, Any] = {"remote": _DELETE, "source": "alice"}
    yield c("vector-update-available", "section 13: the announce (size = the state's tensor bytes, 28)", vector,
            ACCEPT, **fields)
    yield c("new-data", "new-data", encode_announce(NewData(**common, sequence=4, n_samples=120,
                                                            manifest_digest=DIGEST), ALICE, timestamp_ms=NOW),
            ACCEPT, **fields)
    yield c("leaving-to-bob", "leaving, addressed to bob only", encode_announce(
        Leaving(**common, sequence=5, recipient=BOB.public_key, reason="maintenance"), ALICE, timestamp_ms=NOW),
        ACCEPT, **fields)
    yield c("source-unknown", "no pubsub source known: the sender is not compared", vector, ACCEPT,
            remote=_DELETE, source=None)
    yield c("too-large", "65 537 bytes", {"hex": vector.hex(), "zeros": 65537 - len(vector)},
            "TOO_LARGE", **fields)
    yield c("bad-frame", "64 bytes: a signature and no body", vector[:64], "BAD_FRAME", **fields)
    yield c("bad-msgpack-timestamp", "an extra key holding the timestamp extension", signed(add_entry(
        msgpack.packb({k: good[k] for k in list(good)[:12]}, use_bin_type=True), "at",
        b"\xd6\xff\x00\x00\x00\x01")), "BAD_MSGPACK", **fields)
    yield c("bad-msgpack-trailing-byte", "a byte after the body map", vector + b"\xc0", "BAD_MSGPACK", **fields)
    changed: list[tuple[str, dict[str, Any], str]] = [
        ("version-1", {"version": 1}, "UNKNOWN_VERSION"),
        ("version-str", {"version": "2"}, "BAD_TYPE"),
        ("kind-update", {"kind": "update"}, "UNKNOWN_KIND"),
        ("kind-nil", {"kind": None}, "BAD_TYPE"),
        ("event-reboot", {"event": "reboot"}, "UNKNOWN_KIND"),
        ("event-nil", {"event": None}, "BAD_TYPE"),
        ("size-negative", {"size": -1}, "BAD_TYPE"),
        ("extra-key", {"n_samples": 3}, "BAD_TYPE"),
        ("timestamp-str", {"timestamp": "now"}, "BAD_TYPE"),
        ("wrong-federation", {"federation": "other-fed"}, "WRONG_FEDERATION"),
        ("wrong-recipient", {"recipient": CAROL.public_key}, "WRONG_RECIPIENT"),
        ("stale", {"timestamp": NOW - SKEW - 1}, "STALE"),
        ("order-version-before-kind", {"version": 1, "kind": "update"}, "UNKNOWN_VERSION"),
        ("order-kind-type-before-event", {"kind": 7, "event": "reboot"}, "BAD_TYPE"),
        ("order-recipient-before-federation", {"recipient": CAROL.public_key, "federation": "other-fed"},
         "WRONG_RECIPIENT"),
        ("order-federation-before-timestamp", {"federation": "other-fed", "timestamp": 1}, "WRONG_FEDERATION"),
    ]
    for name, changes, code in changed:
        yield c(name, f"changed: {', '.join(changes)}", signed(good | changes), code, **fields)
    yield c("missing-key", "no size", signed({k: v for k, v in good.items() if k != "size"}), "BAD_TYPE", **fields)
    yield c("untrusted-sender", "alice is not trusted", vector, "UNTRUSTED_SENDER", trusted=["carol"], **fields)
    yield c("sender-mismatch", "the pubsub source is carol", vector, "SENDER_MISMATCH",
            trusted=["alice", "carol"], remote=_DELETE, source="carol")
    yield c("bad-signature", "signed by carol", signed(good, CAROL), "BAD_SIGNATURE", **fields)
    yield c("replay", "(alice, 3, 3) seen before", vector, "REPLAY", replay_seen=[["alice", 3, 3]], **fields)
    yield c("order-trust-before-signature", "untrusted, signed by carol", signed(good, CAROL), "UNTRUSTED_SENDER",
            trusted=["bob"], **fields)
    yield c("order-signature-before-federation", "signed by carol, another federation",
            signed(good | {"federation": "other-fed"}, CAROL), "BAD_SIGNATURE", **fields)
    yield c("order-stale-before-replay", "stale and seen before", signed(good | {"timestamp": 1}), "STALE",
            replay_seen=[["alice", 3, 3]], **fields)


# ---------------------------------------------------------------- files


def _identities() -> dict[str, Any]:
    return {
        name: {
            "seed": seed.hex(),
            "ed25519_public_key": IDS[name].public_key.hex(),
            "x25519_public_key": bytes(IDS[name].box_public_key).hex(),
            "peer_id": peer_id_from_public_key(IDS[name].public_key),
        }
        for name, seed in SEEDS.items()
    }


SUITES: dict[str, tuple[str, str, Callable[[], Iterator[tuple[Case, Intended]]]]] = {
    "envelopes.json": ("envelope", "Envelopes opened outside a session: every check of PROTOCOL.md section 10 "
                       "except step 5, the section 13 frames, tensors (section 6) and deltas (section 7).",
                       envelope_cases),
    "sessions.json": ("session", "Frames fed to a session in a given state: section 9's table, step 5 of "
                      "section 10, and the answer to a refusal.", session_cases),
    "announces.json": ("announce", "Announces (section 8).", announce_cases),
}


def _check(name: str, intended: Intended, outcome: Mapping[str, Any], case: Case) -> None:
    if isinstance(intended, str):
        if outcome["outcome"] != intended:
            raise AssertionError(f"{name}: meant to {intended}, the reference gives {outcome}")
        return
    code, answer = intended
    got = (outcome.get("code"), outcome.get("answer"))
    if outcome["outcome"] != "refuse" or got[0] != code:
        raise AssertionError(f"{name}: meant to be refused {code}, the reference gives {outcome}")
    if answer == "reset" and got[1] != "reset":
        raise AssertionError(f"{name}: meant to be reset, the reference answers {got[1]}")
    if answer == "error":
        header, _, _, _ = split(_bytes_of(case["input"])[4 if "session" in case else 0 :])
        want = {"kind": "error", "code": code, "reply_to": header["sequence"], "round": header["round"]}
        if got[1] != want:
            raise AssertionError(f"{name}: meant to be answered {want}, the reference answers {got[1]}")


def build_suite(mode: str, description: str, cases: Iterator[tuple[Case, Intended]]) -> dict[str, Any]:
    suite: dict[str, Any] = {
        "format": FORMAT,
        "protocol_version": PROTOCOL_VERSION,
        "mode": mode,
        "description": description,
        "identities": _identities(),
        "cases": [],
    }
    names: set[str] = set()
    for case, intended in cases:
        if case["name"] in names:
            raise AssertionError(f"two cases named {case['name']}")
        names.add(case["name"])
        if mode == "announce":
            intended = intended if intended == ACCEPT else (str(intended), "")
        outcome = run_case(suite, case)
        if mode == "announce" and not isinstance(intended, str):
            if outcome != {"outcome": "refuse", "code": intended[0]}:
                raise AssertionError(f"{case['name']}: meant to be refused {intended[0]}, got {outcome}")
        else:
            _check(case["name"], intended, outcome, case)
        suite["cases"].append(case | {"expect": outcome})
    return suite


def vectors() -> dict[str, Any]:
    """The section 13 vectors, with the inputs that produce them."""
    ack_env = seal_envelope(Ack(**routing(), reply_to=0, note="ok"), ALICE, timestamp_ms=NOW, nonce=VECTOR_NONCE)
    upd = seal_envelope(
        Update(**routing(sequence=2), tensors=STATE, n_samples=10, state_digest=DIGEST),
        ALICE,
        timestamp_ms=NOW,
        nonce=VECTOR_NONCE,
    )
    payload = bytes(decrypt_in_place(bytearray(upd.ciphertext), BOB.shared_key(ALICE.public_key), VECTOR_NONCE))
    size = sum(a.nbytes for a in STATE.values())
    announce = encode_announce(
        UpdateAvailable(federation=FED, sender=ALICE.public_key, round=3, sequence=3, digest=DIGEST, size=size),
        ALICE,
        timestamp_ms=NOW,
    )
    return {
        "format": FORMAT,
        "protocol_version": PROTOCOL_VERSION,
        "mode": "vectors",
        "description": "PROTOCOL.md section 13: keys, a state digest, an ack, an update and an announce.",
        "identities": _identities(),
        "box_key_alice_bob": ALICE.shared_key(BOB.public_key).hex(),
        "common": {"federation": FED, "timestamp": NOW, "nonce": VECTOR_NONCE.hex()},
        "state": {"tensors": {k: _tensor_json(v) for k, v in sorted(STATE.items())}, "state_digest": DIGEST.hex()},
        "ack": {
            "fields": {"sender": "alice", "recipient": "bob", "round": 3, "sequence": 1, "reply_to": 0, "note": "ok"},
            "frame": ack_env.to_frame().hex(),
        },
        "update": {
            "fields": {"sender": "alice", "recipient": "bob", "round": 3, "sequence": 2, "codec": "float32",
                       "base_digest": None, "n_samples": 10, "state_digest": DIGEST.hex(), "metrics": {},
                       "tensors": "state"},
            "payload": payload.hex(),
            "frame": upd.to_frame().hex(),
        },
        "announce": {
            "fields": {"event": "update-available", "sender": "alice", "recipient": None, "round": 3,
                       "sequence": 3, "digest": DIGEST.hex(), "size": size},
            "bytes": announce.hex(),
        },
    }


def _dump(obj: object) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=True, allow_nan=False) + "\n"


def build() -> dict[str, str]:
    """Every conformance file: name -> text."""
    NONCE.n = 0
    files = {"vectors.json": _dump(vectors())}
    for filename, (mode, description, cases) in SUITES.items():
        files[filename] = _dump(build_suite(mode, description, cases()))
    return files


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in build().items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
