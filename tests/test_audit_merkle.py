"""protocol/merkle.py: RFC 6962 tree hashes, inclusion and consistency proofs, and their verifiers."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from silomesh.protocol import merkle
from silomesh.protocol.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

# The Certificate Transparency reference data set (RFC 6962 test vectors used by the CT
# implementations): eight leaves and the tree head of each prefix.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [  # (leaf index, tree size, audit path)
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CT_CONSISTENCY = [  # (first size, second size, proof)
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CT_HASHES = [leaf_hash(d) for d in CT_LEAVES]


def reference_mth(data: list[bytes]) -> bytes:
    """RFC 6962 §2.1 written out literally: the recursive definition of MTH(D[n])."""
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + reference_mth(data[:k]) + reference_mth(data[k:])).digest()


def _data(n: int) -> list[bytes]:
    return [f"entry:{i}".encode() for i in range(n)]


def _flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 8]) + h[1:]


def test_tree_root_matches_the_ct_reference_heads() -> None:
    for n, root in enumerate(CT_ROOTS):
        assert tree_root(CT_HASHES[:n]).hex() == root


@pytest.mark.parametrize("n", [*range(34), 63, 64, 65, 100])
def test_tree_root_matches_a_straightforward_recursive_implementation(n: int) -> None:
    data = _data(n)
    assert tree_root([leaf_hash(d) for d in data]) == reference_mth(data)


@given(st.lists(st.binary(max_size=40), max_size=80))
def test_tree_root_matches_the_recursive_definition_for_any_leaves(data: list[bytes]) -> None:
    assert tree_root([leaf_hash(d) for d in data]) == reference_mth(data)


def test_frontier_root_equals_the_full_tree_root_at_every_size() -> None:
    frontier = Frontier()
    hashes = [leaf_hash(d) for d in _data(70)]
    assert frontier.root == EMPTY_ROOT
    for i, h in enumerate(hashes, start=1):
        frontier.append(h)
        assert (frontier.size, frontier.root) == (i, tree_root(hashes[:i]))


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert merkle.node_hash(a, b) != leaf_hash(a + b)
    assert leaf_hash(b"") == bytes.fromhex(CT_ROOTS[1])


def test_inclusion_proofs_match_the_ct_reference_paths() -> None:
    for index, size, path in CT_INCLUSION:
        proof = inclusion_proof(CT_HASHES[:size], index)
        assert [p.hex() for p in proof] == path
        assert verify_inclusion(CT_HASHES[index], index, size, proof, bytes.fromhex(CT_ROOTS[size]))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 32, 33])
def test_every_leaf_has_an_inclusion_proof_that_verifies(n: int) -> None:
    hashes = [leaf_hash(d) for d in _data(n)]
    root = reference_mth(_data(n))
    for i in range(n):
        assert verify_inclusion(hashes[i], i, n, inclusion_proof(hashes, i), root)


def _corrupt_inclusion(index: int, size: int, proof: list[bytes], root: bytes, leaf: bytes) -> dict[str, tuple]:
    """Altered proofs after the CT verifier tests: each must fail."""
    probes: dict[str, tuple] = {
        "index - 1": (leaf, index - 1, size, proof, root),
        "index + 1": (leaf, index + 1, size, proof, root),
        "index ^ 2": (leaf, index ^ 2, size, proof, root),
        "size * 2": (leaf, index, size * 2, proof, root),
        "size / 2": (leaf, index, size // 2, proof, root),
        "wrong leaf": (leaf_hash(b"WrongLeaf"), index, size, proof, root),
        "empty root": (leaf, index, size, proof, EMPTY_ROOT),
        "trailing root": (leaf, index, size, [*proof, root], root),
        "preceding root": (leaf, index, size, [root, *proof], root),
        "trailing garbage": (leaf, index, size, [*proof, b""], root),
    }
    for i in range(len(proof)):
        probes[f"flipped bit in proof[{i}]"] = (leaf, index, size, [*proof[:i], _flip(proof[i]), *proof[i + 1 :]], root)
    if proof:
        probes["removed component"] = (leaf, index, size, proof[:-1], root)
    return probes


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13])
def test_altered_inclusion_proofs_fail(n: int) -> None:
    hashes = [leaf_hash(d) for d in _data(n)]
    root = tree_root(hashes)
    for i in range(n):
        proof = inclusion_proof(hashes, i)
        for name, args in _corrupt_inclusion(i, n, proof, root, hashes[i]).items():
            if name in ("index ^ 2",) and (i ^ 2) == i:
                continue
            assert not verify_inclusion(*args), f"{name} verified (leaf {i} of {n})"


def test_inclusion_proof_of_a_leaf_outside_the_tree_is_refused() -> None:
    with pytest.raises(ValueError):
        inclusion_proof(CT_HASHES[:3], 3)
    assert not verify_inclusion(CT_HASHES[0], 0, 0, [], EMPTY_ROOT)


def test_consistency_proofs_match_the_ct_reference_proofs() -> None:
    for first, second, path in CT_CONSISTENCY:
        proof = consistency_proof(CT_HASHES[:second], first)
        assert [p.hex() for p in proof] == path
        assert verify_consistency(first, second, bytes.fromhex(CT_ROOTS[first]), bytes.fromhex(CT_ROOTS[second]), proof)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 17, 33])
def test_every_pair_of_sizes_has_a_consistency_proof_that_verifies(n: int) -> None:
    data = _data(n)
    hashes = [leaf_hash(d) for d in data]
    for m in range(n + 1):
        assert verify_consistency(m, n, reference_mth(data[:m]), reference_mth(data), consistency_proof(hashes, m))


@pytest.mark.parametrize("n", [3, 8, 17])
def test_altered_consistency_proofs_fail(n: int) -> None:
    hashes = [leaf_hash(d) for d in _data(n)]
    r2 = tree_root(hashes)
    for m in range(1, n):
        r1 = tree_root(hashes[:m])
        proof = consistency_proof(hashes, m)
        probes = {
            "first - 1": (m - 1, n, r1, r2, proof),
            "first + 1": (m + 1, n, r1, r2, proof),
            "second * 2": (m, n * 2, r1, r2, proof),
            "wrong first root": (m, n, _flip(r1), r2, proof),
            "wrong second root": (m, n, r1, _flip(r2), proof),
            "swapped roots": (m, n, r2, r1, proof),
            "empty proof": (m, n, r1, r2, []),
            "trailing root": (m, n, r1, r2, [*proof, r1]),
            "preceding root": (m, n, r1, r2, [r2, *proof]),
            "truncated proof": (m, n, r1, r2, proof[:-1]),
        }
        for i in range(len(proof)):
            probes[f"flipped bit in proof[{i}]"] = (m, n, r1, r2, [*proof[:i], _flip(proof[i]), *proof[i + 1 :]])
        for name, args in probes.items():
            if name == "first - 1" and m == 1:
                continue  # size 0 is consistent with everything, given an empty proof only
            assert not verify_consistency(*args), f"{name} verified ({m} -> {n})"


def test_consistency_edge_cases() -> None:
    r1, r2 = tree_root(CT_HASHES[:1]), tree_root(CT_HASHES[:2])
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 2, EMPTY_ROOT, r2, [])
    assert verify_consistency(2, 2, r2, r2, [])
    assert not verify_consistency(2, 2, r2, r1, [])
    assert not verify_consistency(0, 2, EMPTY_ROOT, r2, [EMPTY_ROOT])
    assert not verify_consistency(2, 1, r2, r1, [r1])  # time travel
    with pytest.raises(ValueError):
        consistency_proof(CT_HASHES[:2], 3)
