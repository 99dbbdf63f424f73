"""Thin wrappers over libsodium (through PyNaCl) for the bulk operations.

PyNaCl's public ``nacl.bindings`` functions accept only ``bytes`` and return fresh
copies, which costs two or three extra passes over a 400 MB payload. The three bulk
operations below call the same libsodium functions through PyNaCl's own cffi handle
(``nacl._sodium``) so they can work in place on a ``bytearray``:

* ``crypto_box_easy_afternm`` / ``crypto_box_open_easy_afternm`` (XSalsa20-Poly1305 with
  a precomputed X25519 shared key) - exactly what ``nacl.public.Box`` does;
* ``crypto_generichash_blake2b`` - unkeyed BLAKE2b, identical to ``hashlib.blake2b``.

No cryptography is implemented here; only buffers are arranged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import nacl.bindings
from nacl._sodium import ffi, lib

if TYPE_CHECKING:
    from cffi import FFI

from .limits import DIGEST_SIZE, KEY_SIZE, NONCE_SIZE

__all__ = [
    "MAC_SIZE",
    "Blake2b256",
    "DecryptError",
    "blake2b256",
    "box_shared_key",
    "decrypt_in_place",
    "encrypt_in_place",
]

MAC_SIZE = 16
"""Poly1305 tag length; ``crypto_box_easy`` output is ``tag || ciphertext``."""


class DecryptError(Exception):
    """The ciphertext did not authenticate under the given key and nonce."""


def _ptr(buf: bytes | bytearray | memoryview, *, writable: bool) -> FFI.CData:
    """A cffi ``unsigned char[]`` over ``buf``, without copying it."""
    return ffi.from_buffer("unsigned char[]", buf, require_writable=writable)


def blake2b256(data: bytes | bytearray | memoryview) -> bytes:
    """Unkeyed BLAKE2b with a 32-byte digest (== ``hashlib.blake2b(data, digest_size=32)``).

    Accepts any contiguous buffer without copying it.
    """
    out = ffi.new("unsigned char[]", DIGEST_SIZE)
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    rc = lib.crypto_generichash_blake2b_salt_personal(
        out, DIGEST_SIZE, _ptr(view, writable=False), len(view), ffi.NULL, 0, ffi.NULL, ffi.NULL
    )
    if rc != 0:  # pragma: no cover - libsodium only fails on bad parameters
        raise RuntimeError("crypto_generichash failed")
    return bytes(ffi.buffer(out, DIGEST_SIZE))


def box_shared_key(their_x25519_public: bytes, our_x25519_private: bytes) -> bytes:
    """``crypto_box_beforenm``: the key ``Box(our_private, their_public)`` uses."""
    return nacl.bindings.crypto_box_beforenm(their_x25519_public, our_x25519_private)


def encrypt_in_place(buf: bytearray, shared_key: bytes, nonce: bytes) -> None:
    """Encrypt ``buf[MAC_SIZE:]`` in place; afterwards ``buf`` is ``tag || ciphertext``.

    The result is byte-for-byte what ``Box.encrypt(buf[MAC_SIZE:], nonce).ciphertext``
    returns.

    Args:
        buf: A writable buffer whose first ``MAC_SIZE`` bytes are scratch space.
        shared_key: 32-byte key from :func:`box_shared_key`.
        nonce: 24 bytes, never reused with the same key.
    """
    if len(shared_key) != KEY_SIZE or len(nonce) != NONCE_SIZE or len(buf) < MAC_SIZE:
        raise ValueError("bad key, nonce or buffer size")
    p = _ptr(buf, writable=True)
    # crypto_secretbox_easy writes the body at c + 16; with m == c + 16 it runs in place.
    rc = lib.crypto_box_easy_afternm(p, p + MAC_SIZE, len(buf) - MAC_SIZE, nonce, shared_key)
    if rc != 0:  # pragma: no cover
        raise RuntimeError("crypto_box_easy_afternm failed")


def decrypt_in_place(buf: bytearray | memoryview, shared_key: bytes, nonce: bytes) -> memoryview:
    """Authenticate and decrypt ``tag || ciphertext`` in place.

    Returns:
        A memoryview of the plaintext, ``buf[MAC_SIZE:]``.

    Raises:
        DecryptError: If the tag does not verify (``buf`` is then left unchanged).
    """
    view = memoryview(buf).cast("B")
    if len(view) < MAC_SIZE:
        raise DecryptError("ciphertext shorter than the tag")
    if len(shared_key) != KEY_SIZE or len(nonce) != NONCE_SIZE:
        raise ValueError("bad key or nonce size")
    p = _ptr(view, writable=True)
    rc = lib.crypto_box_open_easy_afternm(p + MAC_SIZE, p, len(view), nonce, shared_key)
    if rc != 0:
        raise DecryptError("authentication tag does not verify")
    return view[MAC_SIZE:]


class Blake2b256:
    """Incremental unkeyed BLAKE2b-256 over buffers (no copies of the input)."""

    def __init__(self) -> None:
        """Start an empty hash."""
        self._state = ffi.new("unsigned char[]", lib.crypto_generichash_statebytes())
        rc = lib.crypto_generichash_blake2b_init_salt_personal(
            self._state, ffi.NULL, 0, DIGEST_SIZE, ffi.NULL, ffi.NULL
        )
        if rc != 0:  # pragma: no cover
            raise RuntimeError("crypto_generichash init failed")

    def state(self) -> bytes:
        """A snapshot of the hash state (no pointers inside: it may be restored anywhere)."""
        return bytes(ffi.buffer(self._state))

    @classmethod
    def restore(cls, state: bytes) -> Blake2b256:
        """A hash that goes on from a :meth:`state` snapshot."""
        h = cls()
        if len(state) != len(ffi.buffer(h._state)):
            raise ValueError("not a BLAKE2b state")
        ffi.memmove(h._state, state, len(state))
        return h

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Absorb ``data`` (any contiguous buffer)."""
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        if len(view):
            lib.crypto_generichash_blake2b_update(
                self._state, _ptr(view, writable=False), len(view)
            )

    def digest(self) -> bytes:
        """Finish and return the 32-byte digest (the object must not be reused)."""
        out = ffi.new("unsigned char[]", DIGEST_SIZE)
        lib.crypto_generichash_blake2b_final(self._state, out, DIGEST_SIZE)
        return bytes(ffi.buffer(out, DIGEST_SIZE))
