"""A peer's identity: one 32-byte Ed25519 seed in a file only its owner can read.

The same seed gives the libp2p PeerID (and the Noise handshake's identity key), the
Ed25519 key that signs envelopes and audit entries, and — converted with
``to_curve25519_private_key`` — the X25519 key that payloads are encrypted to.
py-libp2p's own serialised key format differs from go/js libp2p, so the raw seed is
what we store.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from silomesh.protocol.peerid import PeerIdError, peer_id_from_public_key
from silomesh.protocol.peerid import public_key_from_peer_id as _public_key_from_peer_id

__all__ = [
    "KEY_FILE_NAME",
    "SEED_BYTES",
    "IdentityError",
    "PeerIdentity",
    "load_key_file",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "write_key_file",
]

SEED_BYTES = 32
KEY_FILE_NAME = "peer.key"


class IdentityError(Exception):
    """A key file is missing, malformed, readable by others, or would be overwritten."""


@dataclass(frozen=True)
class PeerIdentity:
    """Keys derived from one Ed25519 seed."""

    seed: bytes
    signing_key: nacl.signing.SigningKey
    key_pair: KeyPair
    peer_id: ID

    @classmethod
    def from_seed(cls, seed: bytes) -> PeerIdentity:
        if len(seed) != SEED_BYTES:
            raise IdentityError(f"an identity seed is {SEED_BYTES} bytes, got {len(seed)}")
        signing_key = nacl.signing.SigningKey(seed)
        private = Ed25519PrivateKey(signing_key)
        key_pair = KeyPair(private, private.get_public_key())
        return cls(seed, signing_key, key_pair, ID.from_pubkey(key_pair.public_key))

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id_text(self) -> str:
        return self.peer_id.to_base58()


def write_key_file(path: Path) -> PeerIdentity:
    """Create a new identity at ``path`` (mode 0600); never overwrites.

    Raises:
        IdentityError: if ``path`` exists or cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = secrets.token_bytes(SEED_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise IdentityError(f"{path} already exists; refusing to overwrite an identity") from None
    except OSError as exc:
        raise IdentityError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.write(fd, seed)
        os.fsync(fd)
    finally:
        os.close(fd)
    return PeerIdentity.from_seed(seed)


def load_key_file(path: Path) -> PeerIdentity:
    """Read an identity written by :func:`write_key_file`.

    Raises:
        IdentityError: if the file is missing, not 32 bytes, or readable by group/others.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"key file {path} not found (create one with 'silomesh keygen')") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"key file {path} is accessible by other users (mode {stat.filemode(info.st_mode)}); run 'chmod 600 {path}'"
        )
    seed = path.read_bytes()
    if len(seed) != SEED_BYTES:
        raise IdentityError(f"key file {path} holds {len(seed)} bytes, expected {SEED_BYTES}")
    return PeerIdentity.from_seed(seed)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Recover the raw Ed25519 public key embedded in an Ed25519 PeerID.

    Ed25519 PeerIDs are identity multihashes of the key, so a trust list needs only
    PeerIDs: the encryption key of a neighbour follows from its PeerID. (The pure
    implementation is :func:`silomesh.protocol.public_key_from_peer_id`.)

    Raises:
        IdentityError: if ``peer_id`` is not a base58 Ed25519 PeerID.
    """
    try:
        return _public_key_from_peer_id(peer_id)
    except PeerIdError as exc:
        raise IdentityError(str(exc)) from None
