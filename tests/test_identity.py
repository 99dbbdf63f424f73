"""Peer identity files: one seed, mode 0600, never overwritten, PeerID derived as libp2p does."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import base58
import nacl.signing
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from silomesh.peer.cli import cli
from silomesh.peer.identity import IdentityError, PeerIdentity, load_key_file, write_key_file
from silomesh.protocol import PeerIdError, peer_id_from_public_key
from silomesh.protocol import public_key_from_peer_id as protocol_public_key_from_peer_id


def _peer_id_by_hand(public_key: bytes) -> str:
    # libp2p PeerID of an Ed25519 key: identity multihash (0x00, len 0x24) over the
    # protobuf PublicKey {Type: Ed25519 (1), Data: 32 bytes}, base58btc encoded.
    protobuf = bytes([0x08, 0x01, 0x12, 0x20]) + public_key
    return base58.b58encode(bytes([0x00, len(protobuf)]) + protobuf).decode()


def test_peer_id_matches_the_libp2p_encoding_of_the_public_key() -> None:
    identity = PeerIdentity.from_seed(bytes(range(32)))
    assert identity.peer_id_text == _peer_id_by_hand(identity.public_key)


def test_same_seed_gives_same_identity_and_other_seed_another() -> None:
    a = PeerIdentity.from_seed(b"\x01" * 32)
    assert a.peer_id_text == PeerIdentity.from_seed(b"\x01" * 32).peer_id_text
    assert a.peer_id_text != PeerIdentity.from_seed(b"\x02" * 32).peer_id_text


def test_key_file_is_written_owner_only_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    created = write_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    assert load_key_file(path).peer_id_text == created.peer_id_text


def test_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    write_key_file(path)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        write_key_file(path)
    assert path.read_bytes() == before


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    write_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_key_file(path)


def test_key_file_of_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"short")
    os.close(fd)
    with pytest.raises(IdentityError, match="5 bytes"):
        load_key_file(path)


def test_missing_key_file_error_names_keygen(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="silomesh keygen"):
        load_key_file(tmp_path / "absent.key")


def test_keygen_command_prints_peer_id_and_refuses_second_run(tmp_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(cli, ["keygen", "--out", str(tmp_path), "--json"])
    assert first.exit_code == 0, first.output
    info = json.loads(first.output)
    assert info["peer_id"] == load_key_file(tmp_path / "peer.key").peer_id_text
    second = runner.invoke(cli, ["keygen", "--out", str(tmp_path)])
    assert second.exit_code == 1
    assert "refusing to overwrite" in second.output


def test_public_key_is_recovered_from_peer_id() -> None:
    from silomesh.peer.identity import public_key_from_peer_id

    identity = PeerIdentity.from_seed(b"\x07" * 32)
    assert public_key_from_peer_id(identity.peer_id_text) == identity.public_key


@pytest.mark.parametrize("bad", ["", "not-base58-0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"])
def test_non_ed25519_peer_id_is_refused(bad: str) -> None:
    from silomesh.peer.identity import public_key_from_peer_id

    with pytest.raises(IdentityError):
        public_key_from_peer_id(bad)


# -- silomesh.protocol.peerid: the same PeerIDs without libp2p ------------------------------


@pytest.mark.parametrize(
    "seed", [bytes(32), bytes(range(32)), b"\x07" * 32, b"\xff" * 32, hashlib.sha256(b"x").digest()]
)
def test_protocol_peer_id_equals_libp2p_id_of_the_same_key(seed: bytes) -> None:
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    public_key = bytes(nacl.signing.SigningKey(seed).verify_key)
    libp2p_id = ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()
    assert peer_id_from_public_key(public_key) == libp2p_id
    assert protocol_public_key_from_peer_id(libp2p_id) == public_key


@given(st.binary(min_size=32, max_size=32))
def test_protocol_peer_id_round_trips_and_matches_libp2p_for_any_32_bytes(public_key: bytes) -> None:
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    peer_id = peer_id_from_public_key(public_key)
    assert peer_id == ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()
    assert protocol_public_key_from_peer_id(peer_id) == public_key


def test_protocol_peer_id_equals_peer_identity_peer_id_text() -> None:
    identity = PeerIdentity.from_seed(b"\x2a" * 32)
    assert peer_id_from_public_key(identity.public_key) == identity.peer_id_text


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33])
def test_protocol_peer_id_of_a_key_that_is_not_32_bytes_is_refused(bad: bytes) -> None:
    with pytest.raises(PeerIdError, match="32 bytes"):
        peer_id_from_public_key(bad)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("", "not an Ed25519 PeerID"),
        ("not-base58-0OIl", "not base58"),
        ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "not an Ed25519 PeerID"),
    ],
)
def test_protocol_refuses_a_non_ed25519_peer_id_with_a_value_error(bad: str, match: str) -> None:
    with pytest.raises(PeerIdError, match=match) as caught:
        protocol_public_key_from_peer_id(bad)
    assert isinstance(caught.value, ValueError)


def test_peer_identity_wraps_the_protocol_error_as_identity_error() -> None:
    from silomesh.peer.identity import public_key_from_peer_id

    with pytest.raises(IdentityError, match="not base58"):
        public_key_from_peer_id("0OIl")
