"""The audit log's format: entries, their hash chain and signatures, and signed tree heads.

Each entry records who, when, which round and kind, the payload digest and size, the
sender's envelope signature and the signed envelope header (routing fields and digests)
— never weights or patient data. Entries form a hash chain:
``entry_hash = BLAKE2b-256(DOMAIN || msgpack([seq, at_ms, direction, peer, round, kind,
payload_digest, size, envelope_sig, reason, prev_hash]))`` with ``prev_hash`` of the first
entry 32 zero bytes (hex); an entry that kept its envelope header appends the header's
hex as a 12th array element. Each ``entry_hash`` is signed with the writer's Ed25519 key.
Changing, deleting, inserting or reordering any entry breaks the chain or a signature.

The writer signs tree heads (:class:`TreeHead`, an RFC 6962 Merkle tree over the entry
hashes) at each round end, every :data:`CHECKPOINT_EVERY` entries, every
:data:`CHECKPOINT_SECONDS` and when it stops, so a truncated tail is detectable and an
entry's inclusion, or two heads' consistency, can be proved to a third party. docs/AUDIT.md specifies all of
it for an independent verifier. The writer itself is ``silomesh.peer.audit.AuditLog``;
nothing here writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from silomesh.protocol.envelope import EnvelopeHeader
from silomesh.protocol.errors import ProtocolError
from silomesh.protocol.limits import MAX_HEADER_SIZE
from silomesh.protocol.merkle import Frontier, leaf_hash
from silomesh.protocol.peerid import PeerIdError, public_key_from_peer_id
from silomesh.protocol.wire import unpack_map

DOMAIN = b"silomesh/audit/v1\x00"
CHECKPOINT_DOMAIN = b"silomesh/audit-checkpoint/v1\x00"
GENESIS = "00" * 32
#: ``local``: an act of the writing peer itself, with no envelope (its privacy spending)
DIRECTIONS = ("sent", "received", "refused", "local")
FIELDS = (
    "seq",
    "at_ms",
    "direction",
    "peer",
    "round",
    "kind",
    "payload_digest",
    "size",
    "envelope_sig",
    "reason",
    "prev_hash",
)
#: every column of an entry, in export order
COLUMNS = (*FIELDS, "envelope_header", "entry_hash", "signature")
#: the ``state`` row naming the log's writer: {"peer_id": ..., "public_key": hex}
WRITER_STATE_KEY = "audit_writer"
HEAD_FORMAT = "silomesh-tree-head/1"
#: the writer signs a head as soon as this many entries are not covered by one ...
CHECKPOINT_EVERY = 64
#: ... and at least this often (seconds) while any entry is not covered; and when it stops.
#: A crash therefore leaves at most CHECKPOINT_EVERY - 1 entries, all of the last
#: CHECKPOINT_SECONDS seconds, unsigned (docs/AUDIT.md).
CHECKPOINT_SECONDS = 60.0


class AuditError(Exception):
    """A log, head or proof cannot be read or is not what it claims to be (an input problem)."""


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Hex BLAKE2b-256 of an entry's canonical encoding (:data:`FIELDS` order, then the header)."""
    values = [entry[f] if entry[f] is not None else "" for f in FIELDS]
    header = entry.get("envelope_header")
    if header:
        values.append(header)
    packed = msgpack.packb(values, use_bin_type=True)
    return hashlib.blake2b(DOMAIN + packed, digest_size=32).hexdigest()


def entry_leaf(entry: Mapping[str, Any]) -> bytes:
    """The Merkle leaf hash of an entry: ``SHA-256(0x00 || entry_hash bytes)``."""
    return leaf_hash(bytes.fromhex(str(entry["entry_hash"])))


def prefix_roots(entries: Sequence[Mapping[str, Any]], sizes: Iterable[int]) -> dict[int, str | None]:
    """Hex root over entries 1..size for each size, in one pass; None where they are not all present in order."""
    wanted = sorted(set(sizes))
    roots: dict[int, str | None] = dict.fromkeys(wanted)
    frontier = Frontier()
    pending = iter(wanted)
    target = next(pending, None)
    while target is not None and target == 0:
        roots[0] = frontier.root.hex()
        target = next(pending, None)
    for position, e in enumerate(entries, start=1):
        if target is None or e.get("seq") != position:
            break
        try:
            frontier.append(entry_leaf(e))
        except (ValueError, KeyError):
            break
        while target is not None and target == position:
            roots[target] = frontier.root.hex()
            target = next(pending, None)
    return roots


def hex_bytes(value: object) -> bytes:
    """The bytes of a hex string; ``b""`` when ``value`` is not hex."""
    try:
        return bytes.fromhex(str(value))
    except ValueError:
        return b""


def parse_envelope_header(hex_header: str) -> EnvelopeHeader | None:
    """The sender-signed envelope header an entry recorded (hex), or None if it is malformed."""
    try:
        return EnvelopeHeader(**unpack_map(bytes.fromhex(hex_header), what="header", max_size=MAX_HEADER_SIZE))
    except (ProtocolError, ValueError, TypeError):
        return None


def verify_ed25519(public_key: bytes, message: bytes, signature_hex: str) -> bool:
    """True if ``signature_hex`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    try:
        nacl.signing.VerifyKey(public_key).verify(message, bytes.fromhex(signature_hex))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


def key_of(peer_id: str) -> bytes | None:
    """The Ed25519 key inside ``peer_id``, or None if it is not an Ed25519 PeerID."""
    try:
        return public_key_from_peer_id(peer_id)
    except PeerIdError:
        return None


@dataclass(frozen=True)
class TreeHead:
    """A signed tree head: the writer commits to the first ``size`` entries of its log.

    The signature is Ed25519 over ``CHECKPOINT_DOMAIN || msgpack([peer_id, size, at_ms,
    root_hash])`` (``root_hash`` as lower-case hex) by the key inside ``peer_id``.
    """

    peer_id: str
    size: int
    root_hash: str
    at_ms: int
    signature: str = ""

    def signed_bytes(self) -> bytes:
        packed = msgpack.packb([self.peer_id, self.size, self.at_ms, self.root_hash], use_bin_type=True)
        return CHECKPOINT_DOMAIN + packed

    @property
    def public_key(self) -> bytes:
        """The writer's Ed25519 key, taken from its PeerID.

        Raises:
            AuditError: if ``peer_id`` is not an Ed25519 PeerID.
        """
        try:
            return public_key_from_peer_id(self.peer_id)
        except PeerIdError as exc:
            raise AuditError(str(exc)) from None

    def verify(self, public_key: bytes | None = None) -> bool:
        """True if the signature is the writer's (or, when given, ``public_key``'s)."""
        try:
            key = public_key if public_key is not None else self.public_key
        except AuditError:
            return False
        return verify_ed25519(key, self.signed_bytes(), self.signature)

    def to_json(self) -> dict[str, Any]:
        try:
            public_key = self.public_key.hex()
        except AuditError:
            public_key = ""
        return {
            "format": HEAD_FORMAT,
            "peer_id": self.peer_id,
            "public_key": public_key,
            "size": self.size,
            "root_hash": self.root_hash,
            "at_ms": self.at_ms,
            "signature": self.signature,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TreeHead:
        """Parse a head written by :meth:`to_json` (or a ``checkpoints`` row).

        Raises:
            AuditError: if a field is missing or has the wrong type.
        """
        try:
            head = cls(
                peer_id=str(obj["peer_id"]),
                size=obj["size"],
                root_hash=str(obj["root_hash"]),
                at_ms=obj["at_ms"],
                signature=str(obj["signature"]),
            )
        except (KeyError, TypeError) as exc:
            raise AuditError(f"not a signed tree head: missing {exc}") from None
        if type(head.size) is not int or type(head.at_ms) is not int or head.size < 0:
            raise AuditError("not a signed tree head: size and at_ms must be integers")
        return head
