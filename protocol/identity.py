"""Peer identity: one 32-byte Ed25519 seed gives every key a peer needs.

A peer is named on the wire by its raw 32-byte Ed25519 public key. The same seed gives
the libp2p PeerID (peer layer), the signing key for envelopes and announces, and (via
``to_curve25519_private_key``) the X25519 key that payloads are encrypted to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions
import nacl.signing
from nacl.public import PrivateKey, PublicKey

from .crypto import box_shared_key
from .errors import ErrorCode, LocalProtocolError
from .limits import KEY_SIZE, SIGNATURE_SIZE

__all__ = ["Identity", "verify_signature", "x25519_public_key"]

logger = logging.getLogger(__name__)

_SHARED_KEY_CACHE_SIZE = 4096


def x25519_public_key(ed25519_public_key: bytes) -> bytes:
    """Convert a peer's Ed25519 public key to its X25519 (Box) public key.

    Raises:
        LocalProtocolError: BAD_TYPE if the bytes are not a valid Ed25519 point.
    """
    if type(ed25519_public_key) is not bytes or len(ed25519_public_key) != KEY_SIZE:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "public key must be 32 bytes")
    try:
        return bytes(nacl.signing.VerifyKey(ed25519_public_key).to_curve25519_public_key())
    except nacl.exceptions.CryptoError:
        raise LocalProtocolError(ErrorCode.BAD_TYPE, "not a valid Ed25519 public key") from None


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Return True if ``signature`` is a valid Ed25519 signature of ``message``."""
    if len(public_key) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        return False
    return True


@dataclass(frozen=True, eq=False, repr=False)
class Identity:
    """All keys derived from one Ed25519 seed.

    Attributes:
        signing_key: Ed25519 signing key (holds the seed).
        verify_key: Ed25519 verify key; ``bytes(verify_key)`` is the wire identity.
        box_private_key: X25519 private key for ``Box`` (from the Ed25519 seed).
        box_public_key: X25519 public key matching ``box_private_key``.
    """

    signing_key: nacl.signing.SigningKey
    verify_key: nacl.signing.VerifyKey
    box_private_key: PrivateKey
    box_public_key: PublicKey
    _shared: dict[bytes, bytes] = field(default_factory=dict, compare=False)

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Derive every key from a 32-byte seed (pure: same seed, same keys).

        Raises:
            LocalProtocolError: BAD_TYPE if ``seed`` is not 32 bytes.
        """
        if not isinstance(seed, bytes | bytearray) or len(seed) != KEY_SIZE:
            raise LocalProtocolError(ErrorCode.BAD_TYPE, "seed must be 32 bytes")
        signing = nacl.signing.SigningKey(bytes(seed))
        box_private = signing.to_curve25519_private_key()
        return cls(
            signing_key=signing,
            verify_key=signing.verify_key,
            box_private_key=box_private,
            box_public_key=box_private.public_key,
        )

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls.from_seed(nacl.bindings.randombytes(KEY_SIZE))

    @property
    def seed(self) -> bytes:
        """The 32-byte seed (secret: store with mode 0600)."""
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key that names this peer on the wire."""
        return bytes(self.verify_key)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte detached Ed25519 signature of ``message``."""
        return self.signing_key.sign(message).signature

    def shared_key(self, peer_public_key: bytes) -> bytes:
        """The ``Box(self, peer)`` key for a peer named by its Ed25519 public key.

        Cached, because deriving it costs two point conversions and one X25519.

        Raises:
            LocalProtocolError: BAD_TYPE if the peer key is not a valid Ed25519 point.
        """
        key = self._shared.get(peer_public_key)
        if key is None:
            key = box_shared_key(x25519_public_key(peer_public_key), bytes(self.box_private_key))
            if len(self._shared) >= _SHARED_KEY_CACHE_SIZE:
                self._shared.clear()
            self._shared[peer_public_key] = key
        return key

    def __repr__(self) -> str:
        return f"Identity(public_key={self.public_key.hex()})"
