"""Merkle hash trees as in Certificate Transparency (RFC 6962 §2.1, RFC 9162 §2.1).

Pure functions over byte strings, no I/O. The hash is SHA-256; a leaf is hashed as
``SHA-256(0x00 || data)`` and an interior node as ``SHA-256(0x01 || left || right)``,
so a leaf can never be passed off as a node (second-preimage resistance). The tree over
``n`` leaves splits at ``k``, the largest power of two smaller than ``n``:
``MTH(D[n]) = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))``; the empty tree's hash is
``SHA-256("")``.

The audit log uses it for signed tree heads over its entries: an inclusion proof shows
that one entry is in the log a head commits to, a consistency proof that a later head
extends an earlier one (nothing was rewritten or dropped in between).

Functions that build proofs take *leaf hashes* (:func:`leaf_hash` of each datum) so a
caller holding only hashes can prove. Verifiers return ``False`` for any malformed
input rather than raising.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The hash of the empty tree, ``SHA-256("")``."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def tree_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of leaves given by their leaf hashes.

    Computed level by level: pairs are hashed left to right and a last unpaired node is
    carried up unchanged, which yields the same tree as RFC 6962's recursive split.
    """
    if not leaf_hashes:
        return EMPTY_ROOT
    level = list(leaf_hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class Frontier:
    """The right edge of a growing tree: the roots of its perfect subtrees, largest first.

    Appending a leaf and asking for the root cost O(log n), so a log that signs a tree
    head after every round need not rehash everything it holds.
    """

    def __init__(self) -> None:
        self.size = 0
        self._nodes: list[tuple[int, bytes]] = []  # (subtree size, subtree root)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash at the right."""
        node, height = leaf, 1
        while self._nodes and self._nodes[-1][0] == height:
            _, left = self._nodes.pop()
            node, height = node_hash(left, node), height * 2
        self._nodes.append((height, node))
        self.size += 1

    @property
    def root(self) -> bytes:
        """``MTH`` of the leaves appended so far."""
        if not self._nodes:
            return EMPTY_ROOT
        r = self._nodes[-1][1]
        for _, left in reversed(self._nodes[:-1]):
            r = node_hash(left, r)
        return r


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path ``PATH(index, D[n])`` of RFC 9162 §2.1.3.1, leaf to root.

    Raises:
        ValueError: if ``index`` is not a leaf of the tree.
    """
    if not 0 <= index < len(leaf_hashes):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaf_hashes)} leaves")
    path: list[bytes] = []
    lo, hi, m = 0, len(leaf_hashes), index
    siblings: list[bytes] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            siblings.append(tree_root(leaf_hashes[lo + k : hi]))
            hi = lo + k
        else:
            siblings.append(tree_root(leaf_hashes[lo : lo + k]))
            lo, m = lo + k, m - k
    path.extend(reversed(siblings))
    return path


def consistency_proof(leaf_hashes: Sequence[bytes], first_size: int) -> list[bytes]:
    """``PROOF(m, D[n])`` of RFC 9162 §2.1.4.1: the tree of ``first_size`` leaves is a prefix.

    Empty for ``first_size`` 0 or ``n`` (nothing to prove).

    Raises:
        ValueError: if ``first_size`` is negative or larger than the tree.
    """
    n = len(leaf_hashes)
    if not 0 <= first_size <= n:
        raise ValueError(f"cannot prove a tree of {first_size} leaves inside one of {n}")
    if first_size in (0, n):
        return []
    proof: list[bytes] = []
    lo, hi, m, complete = 0, n, first_size, True
    while True:
        if m == hi - lo:  # SUBPROOF(m, D[m], b)
            if not complete:
                proof.append(tree_root(leaf_hashes[lo:hi]))
            break
        k = _split(hi - lo)
        if m <= k:
            proof.append(tree_root(leaf_hashes[lo + k : hi]))
            hi = lo + k
        else:
            proof.append(tree_root(leaf_hashes[lo : lo + k]))
            lo, m, complete = lo + k, m - k, False
    return list(reversed(proof))


def root_from_inclusion(leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes]) -> bytes | None:
    """The root an inclusion proof leads to (RFC 9162 §2.1.3.2), or None if it is malformed."""
    if not 0 <= index < tree_size or any(len(p) != HASH_SIZE for p in proof) or len(leaf) != HASH_SIZE:
        return None
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """True if ``proof`` shows the leaf hash ``leaf`` at ``index`` in the tree with ``root``."""
    return root_from_inclusion(leaf, index, tree_size, proof) == root


def verify_consistency(
    first_size: int, second_size: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True if ``proof`` shows the tree (first_size, first_root) is a prefix of (second_size, second_root).

    The algorithm of RFC 9162 §2.1.4.2; equal sizes need equal roots and an empty proof,
    and every tree extends the empty one (with an empty proof).
    """
    if not 0 <= first_size <= second_size or any(len(p) != HASH_SIZE for p in proof):
        return False
    if first_size == second_size:
        return not proof and first_root == second_root
    if first_size == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if first_size & (first_size - 1) == 0:  # an exact power of two: the first root is a node of the proof
        path.insert(0, first_root)
    fn, sn = first_size - 1, second_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
