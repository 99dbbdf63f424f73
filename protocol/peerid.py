"""libp2p PeerIDs of Ed25519 keys, computed without libp2p.

An Ed25519 PeerID is the base58btc text of an *identity* multihash (code ``0x00``,
length ``0x24``) over the libp2p protobuf ``PublicKey {Type: Ed25519 (1), Data: key}``
— i.e. the fixed prefix ``00 24 08 01 12 20`` followed by the raw 32-byte key. Because
the key is inside the PeerID, a trust list needs only PeerIDs, and an auditor can check
signatures knowing only who wrote a log. These helpers give exactly what py-libp2p's
``ID.from_pubkey(...).to_base58()`` gives for an Ed25519 key (a test compares them), so
the audit tools and the protocol layer need neither libp2p nor trio.
"""

from __future__ import annotations

from .limits import KEY_SIZE

__all__ = ["PeerIdError", "peer_id_from_public_key", "public_key_from_peer_id"]

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
#: identity multihash (0x00, 36 bytes) of protobuf PublicKey{Type=Ed25519 (field 1 = 1), Data (field 2, 32 bytes)}
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


class PeerIdError(ValueError):
    """A PeerID is not the base58 PeerID of an Ed25519 key, or a key is not 32 bytes."""


def _b58encode(data: bytes) -> str:
    """Base58btc (Bitcoin alphabet): one leading ``1`` per leading zero byte."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    digits = []
    while n:
        n, r = divmod(n, 58)
        digits.append(_ALPHABET[r])
    return "1" * zeros + "".join(reversed(digits))


def _b58decode(text: str) -> bytes:
    """Inverse of :func:`_b58encode`; trailing whitespace is ignored (as the ``base58`` package does).

    Raises:
        PeerIdError: on a character outside the base58btc alphabet.
    """
    text = text.rstrip()
    body = text.lstrip("1")
    n = 0
    for char in body:
        digit = _INDEX.get(char)
        if digit is None:
            raise PeerIdError(f"invalid base58 character {char!r}")
        n = n * 58 + digit
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(body)) + raw


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 PeerID of a raw 32-byte Ed25519 public key (``12D3KooW...``).

    Raises:
        PeerIdError: if ``public_key`` is not 32 bytes.
    """
    if not isinstance(public_key, bytes | bytearray) or len(public_key) != KEY_SIZE:
        raise PeerIdError(f"an Ed25519 public key is {KEY_SIZE} bytes")
    return _b58encode(_ED25519_PEER_ID_PREFIX + bytes(public_key))


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Recover the raw Ed25519 public key embedded in an Ed25519 PeerID.

    Raises:
        PeerIdError: if ``peer_id`` is not a base58 Ed25519 PeerID.
    """
    try:
        raw = _b58decode(peer_id)
    except PeerIdError:
        raise PeerIdError(f"{peer_id!r} is not base58") from None
    if len(raw) != len(_ED25519_PEER_ID_PREFIX) + KEY_SIZE or not raw.startswith(_ED25519_PEER_ID_PREFIX):
        raise PeerIdError(f"{peer_id!r} is not an Ed25519 PeerID (they start with 12D3KooW)")
    return raw[len(_ED25519_PEER_ID_PREFIX) :]
