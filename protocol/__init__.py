"""silomesh.protocol: the sans-I/O wire protocol.

Frames, messages, envelopes (Ed25519 signatures, X25519 Box encryption), announces,
the tensor codec, the replay guard, Ed25519 PeerIDs and the exchange session state machine. Nothing
here does I/O or imports trio, libp2p, torch or sqlite3. See ``docs/PROTOCOL.md``.
"""

from __future__ import annotations

from .announce import (
    ANNOUNCE_SIGNING_DOMAIN,
    Announce,
    AnnounceEvent,
    Leaving,
    NewData,
    ReceivedAnnounce,
    UpdateAvailable,
    announce_topic,
    decode_announce,
    encode_announce,
)
from .codec import WIRE_DTYPES, Codec, EncodedTensors, decode_tensors, encode_tensors
from .envelope import (
    ENVELOPE_SIGNING_DOMAIN,
    AuthenticatedEnvelope,
    EnvelopeHeader,
    OpenedEnvelope,
    SealedEnvelope,
    authenticate_envelope,
    open_authenticated,
    open_envelope,
    read_header,
    seal_envelope,
)
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .frames import CLOSED, NEED_DATA, FrameDecoder, Signal, encode_frame, frame_prefix
from .identity import Identity, verify_signature, x25519_public_key
from .limits import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_SKEW_MS,
    EXCHANGE_PROTOCOL_ID,
    MAX_ANNOUNCE_SIZE,
    MAX_MSGPACK_DEPTH,
    PROTOCOL_VERSION,
    Limits,
)
from .messages import (
    MESSAGE_TYPES,
    Ack,
    ErrorMessage,
    Hello,
    Kind,
    Message,
    NeedBase,
    TensorMessage,
    TrainRequest,
    TrainResult,
    Update,
)
from .peerid import PeerIdError, peer_id_from_public_key, public_key_from_peer_id
from .replay import ReplayGuard, ReplayStatistics
from .session import Role, Session, State
from .state import apply_delta, make_delta, state_digest

__all__ = [
    "ANNOUNCE_SIGNING_DOMAIN",
    "CLOSED",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_SKEW_MS",
    "ENVELOPE_SIGNING_DOMAIN",
    "EXCHANGE_PROTOCOL_ID",
    "MAX_ANNOUNCE_SIZE",
    "MAX_MSGPACK_DEPTH",
    "MESSAGE_TYPES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "WIRE_DTYPES",
    "Ack",
    "Announce",
    "AnnounceEvent",
    "AuthenticatedEnvelope",
    "Codec",
    "EncodedTensors",
    "EnvelopeHeader",
    "ErrorCode",
    "ErrorMessage",
    "FrameDecoder",
    "Hello",
    "Identity",
    "Kind",
    "Leaving",
    "Limits",
    "LocalProtocolError",
    "Message",
    "NeedBase",
    "NewData",
    "OpenedEnvelope",
    "PeerIdError",
    "ProtocolError",
    "ReceivedAnnounce",
    "RemoteProtocolError",
    "ReplayGuard",
    "ReplayStatistics",
    "Role",
    "SealedEnvelope",
    "Session",
    "Signal",
    "State",
    "TensorMessage",
    "TrainRequest",
    "TrainResult",
    "Update",
    "UpdateAvailable",
    "announce_topic",
    "apply_delta",
    "authenticate_envelope",
    "decode_announce",
    "decode_tensors",
    "encode_announce",
    "encode_frame",
    "encode_tensors",
    "frame_prefix",
    "make_delta",
    "open_authenticated",
    "open_envelope",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "read_header",
    "seal_envelope",
    "state_digest",
    "verify_signature",
    "x25519_public_key",
]
