"""The audit log: verification finds each kind of tampering by entry number, proofs, export, CLI.

Logs here are written by AuditLog with real sealed envelopes between two identities, then
tampered with directly in SQLite (as someone with file access would) or in a JSONL export.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing
import pytest
from click.testing import CliRunner, Result
from peerkit import identity

from silomesh.audit.cli import audit
from silomesh.audit.entries import CHECKPOINT_DOMAIN, DOMAIN, GENESIS, AuditError, TreeHead, entry_hash
from silomesh.audit.logfile import load_log
from silomesh.audit.proofs import check_consistency, check_inclusion, consistency, inclusion
from silomesh.audit.reconcile import reconcile
from silomesh.audit.verify import verify_chain, verify_log
from silomesh.peer.audit import AuditLog
from silomesh.peer.identity import PeerIdentity
from silomesh.peer.store import Store
from silomesh.protocol import Ack, Identity, seal_envelope
from silomesh.protocol.envelope import ENVELOPE_SIGNING_DOMAIN, SealedEnvelope
from silomesh.protocol.merkle import leaf_hash, tree_root

A, B = identity("audit-a"), identity("audit-b")
AUDIT_MD = Path(__file__).resolve().parent.parent / "docs" / "AUDIT.md"
ROUNDS = 4  # 4 entries per round in each log: sent, received, sent, received
OTHER_KEY = nacl.signing.SigningKey(b"\x07" * 32)
OTHER = identity("audit-other")


def _seal(sender: PeerIdentity, recipient: PeerIdentity, round: int, seq: int) -> SealedEnvelope:
    msg = Ack(
        federation="audit-fed",
        sender=sender.public_key,
        recipient=recipient.public_key,
        round=round,
        sequence=seq,
        reply_to=seq,
    )
    return seal_envelope(msg, Identity.from_seed(sender.seed), timestamp_ms=1_700_000_000_000 + seq)


def _record(log: AuditLog, direction: str, other: PeerIdentity, sealed: SealedEnvelope) -> None:
    log.append(
        direction,
        other.peer_id_text,
        "ack",
        round=sealed.header.round,
        payload_digest=sealed.header.payload_digest.hex(),
        size=sealed.size,
        envelope_sig=sealed.signature.hex(),
        envelope_header=sealed.header_bytes,
    )


def _write_pair(root: Path, *, checkpoint_every_round: bool = True) -> tuple[Path, Path]:
    """Logs of A and B: each round, each sends one ack and receives the other's, twice."""
    stores = {p.peer_id_text: Store(root / name / "store.sqlite") for p, name in ((A, "a"), (B, "b"))}
    logs = {p.peer_id_text: AuditLog(stores[p.peer_id_text], p.signing_key) for p in (A, B)}
    seq = 0
    for r in range(ROUNDS):
        for sender, recipient in ((A, B), (B, A)) * 2:
            seq += 1
            sealed = _seal(sender, recipient, r, seq)
            _record(logs[sender.peer_id_text], "sent", recipient, sealed)
            _record(logs[recipient.peer_id_text], "received", sender, sealed)
        if checkpoint_every_round:
            for log in logs.values():
                log.checkpoint()
    for s in stores.values():
        s.close()
    return root / "a" / "store.sqlite", root / "b" / "store.sqlite"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _write_pair(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def log_a(pristine: tuple[Path, Path], tmp_path: Path) -> Path:
    """A fresh copy of A's store (16 entries, a signed head after each round)."""
    dest = tmp_path / "a" / "store.sqlite"
    dest.parent.mkdir()
    shutil.copy(pristine[0], dest)
    return dest


def _sql(path: Path, *statements: tuple[str, list[Any]]) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for sql, args in statements:
            conn.execute(sql, args)
    conn.close()


def _row(path: Path, seq: int) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM audit WHERE seq = ?", [seq]).fetchone())
    conn.close()
    return row


def _found(path: Path, **kwargs: Any) -> set[tuple[int | None, str]]:
    return {(f.entry, f.code) for f in verify_log(load_log(path), **kwargs).findings}


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(audit, [str(a) for a in args], catch_exceptions=False)


def _cli_json(*args: str | Path) -> tuple[int, Any]:
    result = _cli(*args, "--json")
    return result.exit_code, json.loads(result.output)


# -- intact logs ----------------------------------------------------------------------


def test_intact_log_verifies_with_no_extra_input(log_a: Path) -> None:
    report = verify_log(load_log(log_a))
    assert report.ok, report.findings
    assert (report.entries, report.envelope_signatures_checked, report.latest_checkpoint) == (16, 16, 16)
    assert report.peer_id == A.peer_id_text
    result = _cli("verify", log_a)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK ") and len(result.output.strip().splitlines()) == 1


def test_peer_data_folder_and_jsonl_export_verify_like_the_store(log_a: Path, tmp_path: Path) -> None:
    assert _cli("verify", log_a.parent).exit_code == 0
    out = tmp_path / "a.jsonl"
    assert _cli("export", log_a, "--format", "jsonl", "--out", out).exit_code == 0
    assert verify_log(load_log(out)).ok
    code, report = _cli_json("verify", out)
    assert (code, report["ok"], report["entries"]) == (0, True, 16)


def test_pinned_key_of_the_writer_verifies_and_another_key_is_reported(log_a: Path) -> None:
    assert _cli("verify", log_a, "--key", A.public_key.hex()).exit_code == 0
    assert _cli("verify", log_a, "--key", A.peer_id_text).exit_code == 0
    code, report = _cli_json("verify", log_a, "--key", B.public_key.hex())
    assert code == 1
    codes = {(f["entry"], f["code"]) for f in report["findings"]}
    assert (None, "key") in codes
    assert {(s, "signature") for s in range(1, 17)} <= codes


def test_log_that_does_not_name_its_writer_needs_a_key(log_a: Path) -> None:
    _sql(log_a, ("DELETE FROM state", []), ("DELETE FROM checkpoints", []))
    result = _cli("verify", log_a)
    assert result.exit_code == 2
    assert "--key" in result.output and "Traceback" not in result.output
    assert _cli("verify", log_a, "--key", A.public_key.hex()).exit_code == 0


def test_missing_or_foreign_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for target in (tmp_path / "absent.sqlite", tmp_path):
        result = _cli("verify", target)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xff\xfe not a log")
    assert _cli("verify", junk).exit_code == 2


# -- tampering: each detected, with the right entry number ---------------------------------


def test_one_changed_byte_is_reported_as_that_entry_modified(log_a: Path) -> None:
    digest = _row(log_a, 5)["payload_digest"]
    _sql(
        log_a, ("UPDATE audit SET payload_digest = ? WHERE seq = 5", [("0" if digest[0] != "0" else "1") + digest[1:]])
    )
    assert _found(log_a) == {(5, "modified"), (5, "envelope")}
    code, report = _cli_json("verify", log_a)
    assert code == 1 and {f["entry"] for f in report["findings"]} == {5}
    result = _cli("verify", log_a)
    assert result.exit_code == 1
    assert "entry 5: [modified]" in result.output


def test_deleted_entry_is_reported_missing_by_number(log_a: Path) -> None:
    _sql(log_a, ("DELETE FROM audit WHERE seq = 7", []))
    found = _found(log_a)
    assert (7, "deleted") in found
    assert {e for e, _ in found} <= {7, None}  # plus the checkpoints that covered it
    result = _cli("verify", log_a)
    assert result.exit_code == 1 and "entry 7 is missing (deleted)" in result.output


def test_deleted_entry_with_later_entries_renumbered_is_still_found(log_a: Path) -> None:
    _sql(log_a, ("DELETE FROM audit WHERE seq = 7", []), ("UPDATE audit SET seq = seq - 1 WHERE seq > 7", []))
    found = _found(log_a)
    assert (7, "deleted") in found
    assert {(s, "reordered") for s in range(7, 16)} <= found
    assert not any(code == "truncated" for _, code in found)
    assert "entry 7 holds the content signed as entry 8" in _cli("verify", log_a).output


def test_swapped_entries_are_reported_as_reordered(log_a: Path) -> None:
    cols = [c for c in _row(log_a, 3) if c != "seq"]
    r3, r10 = _row(log_a, 3), _row(log_a, 10)
    assign = ", ".join(f"{c} = ?" for c in cols)
    _sql(
        log_a,
        (f"UPDATE audit SET {assign} WHERE seq = 3", [r10[c] for c in cols]),
        (f"UPDATE audit SET {assign} WHERE seq = 10", [r3[c] for c in cols]),
    )
    found = _found(log_a)
    assert {(3, "reordered"), (10, "reordered")} <= found
    assert {e for e, _ in found} <= {3, 10, None}
    result = _cli("verify", log_a)
    assert "entry 3 holds the content signed as entry 10" in result.output


def test_truncated_tail_is_caught_by_the_latest_signed_head(log_a: Path) -> None:
    _sql(log_a, ("DELETE FROM audit WHERE seq > 13", []))
    assert _found(log_a) == {(14, "truncated")}
    result = _cli("verify", log_a)
    assert result.exit_code == 1 and "entries 14-16 gone" in result.output


def test_truncation_with_checkpoints_removed_is_caught_by_a_kept_head(log_a: Path, tmp_path: Path) -> None:
    head = tmp_path / "head.json"
    head.write_text(_cli("head", log_a).output)
    _sql(log_a, ("DELETE FROM audit WHERE seq > 9", []), ("DELETE FROM checkpoints WHERE size > 8", []))
    assert _cli("verify", log_a).exit_code == 0  # nothing in the file itself shows it
    result = _cli("verify", log_a, "--head", head)
    assert result.exit_code == 1 and "entry 10: [truncated]" in result.output


def test_entry_rewritten_and_signed_with_another_key_is_a_signature_failure(log_a: Path) -> None:
    row = _row(log_a, 11)
    row["size"] += 1
    row["entry_hash"] = entry_hash(row)
    row["signature"] = OTHER_KEY.sign(bytes.fromhex(row["entry_hash"])).signature.hex()
    _sql(
        log_a,
        (
            "UPDATE audit SET size = ?, entry_hash = ?, signature = ? WHERE seq = 11",
            [row["size"], row["entry_hash"], row["signature"]],
        ),
    )
    found = _found(log_a)
    assert (11, "signature") in found
    assert {e for e, _ in found} <= {11, None}
    assert "entry 11: [signature]" in _cli("verify", log_a).output


def test_forged_envelope_signature_is_reported(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    log = AuditLog(store, A.signing_key)
    _record(log, "received", B, _seal(B, A, 0, 1))
    sealed = _seal(B, A, 0, 2)
    forged = OTHER_KEY.sign(ENVELOPE_SIGNING_DOMAIN + sealed.header_bytes).signature.hex()
    log.append(
        "received",
        B.peer_id_text,
        "ack",
        round=0,
        payload_digest=sealed.header.payload_digest.hex(),
        size=sealed.size,
        envelope_sig=forged,
        envelope_header=sealed.header_bytes,
    )
    _record(log, "received", B, _seal(B, A, 0, 3))
    store.close()
    assert _found(tmp_path) == {(2, "envelope")}
    result = _cli("verify", tmp_path)
    assert result.exit_code == 1
    assert f"entry 2: [envelope] entry 2: envelope signature does not verify with the key of {B.peer_id_text}" in (
        result.output
    )


def test_entry_appended_by_someone_else_is_reported(log_a: Path) -> None:
    store = Store(log_a)
    AuditLog(store, OTHER_KEY).append("received", B.peer_id_text, "hello", reason="forged")
    store.close()
    assert (17, "signature") in _found(log_a)


def test_jsonl_swapped_deleted_and_duplicated_lines(log_a: Path, tmp_path: Path) -> None:
    lines = _cli("export", log_a).output.splitlines()
    assert json.loads(lines[5])["seq"] == 5
    cases = {
        "swapped": ([*lines[:5], lines[6], lines[5], *lines[7:]], {(5, "reordered")}),
        "deleted": (lines[:5] + lines[6:], {(5, "deleted")}),
        "duplicated": ([*lines[:6], lines[5], *lines[6:]], {(5, "inserted")}),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(content) + "\n")
        found = _found(path)
        assert expected <= found, (name, found)
        assert {e for e, _ in found} <= {5, 6, None}, (name, found)


def _insert_row(path: Path, row: dict[str, Any]) -> None:
    _sql(path, (f"INSERT INTO audit ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())))


def test_a_replayed_genuine_entry_is_reported_inserted(
    log_a: Path, pristine: tuple[Path, Path], tmp_path: Path
) -> None:
    _insert_row(log_a, {**_row(log_a, 5), "seq": 17})  # entry 5 again, at the end
    assert _found(log_a) == {(17, "inserted")}
    result = _cli("verify", log_a)
    assert result.exit_code == 1 and "entry 17: [inserted] entry 17 repeats the entry signed as number 5" in (
        result.output
    )
    # a copy slipped in after its original, the later entries renumbered to make room
    shifted = tmp_path / "shifted.sqlite"
    shutil.copy(pristine[0], shifted)
    _sql(
        shifted,
        ("UPDATE audit SET seq = seq + 100 WHERE seq > 5", []),
        ("UPDATE audit SET seq = seq - 99 WHERE seq > 100", []),
    )
    _insert_row(shifted, {**_row(shifted, 5), "seq": 6})
    found = _found(shifted)
    assert (6, "inserted") in found and (6, "reordered") not in found
    assert {(s, "reordered") for s in range(7, 18)} <= found
    assert not any(code == "deleted" for _, code in found)


def test_a_received_entry_without_its_envelope_header_fails_verify(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    log = AuditLog(store, A.signing_key)
    _record(log, "received", B, _seal(B, A, 0, 1))
    sealed = _seal(B, A, 0, 2)
    # the writer itself records a receive whose header it does not keep: nothing a neighbour signed backs it
    log.append(
        "received",
        B.peer_id_text,
        "ack",
        round=0,
        payload_digest=sealed.header.payload_digest.hex(),
        size=sealed.size,
        envelope_sig=sealed.signature.hex(),
    )
    log.append("sent", B.peer_id_text, "ack", round=0, payload_digest="ab" * 32, size=300)  # nothing at all
    _record(log, "received", B, _seal(B, A, 0, 3))
    log.checkpoint()
    store.close()
    report = verify_log(load_log(tmp_path))
    assert {(f.entry, f.code) for f in report.findings} == {(2, "header"), (3, "header")}
    assert report.envelope_signatures_checked == 2
    result = _cli("verify", tmp_path)
    assert result.exit_code == 1
    assert "entry 2: [header] entry 2: a received entry must record its envelope's signature and signed header" in (
        result.output
    )
    assert "entry 3: [header]" in result.output and "no envelope signature and no envelope header" in result.output


def test_a_refused_entry_records_its_authenticated_envelope_or_none(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    log = AuditLog(store, A.signing_key)
    log.append("refused", B.peer_id_text, "connection", reason="untrusted-connection")  # nothing authenticated
    sealed = _seal(B, A, 0, 1)
    log.append(  # a message declined after it authenticated: one refused entry, with header and reason code
        "refused",
        B.peer_id_text,
        "ack",
        round=0,
        payload_digest=sealed.header.payload_digest.hex(),
        size=sealed.size,
        envelope_sig=sealed.signature.hex(),
        reason="STATE_MISMATCH: the update does not produce the state_digest it announced",
        envelope_header=sealed.header_bytes,
    )
    report = verify_log(load_log(tmp_path))
    assert report.ok, report.findings
    assert report.envelope_signatures_checked == 1, "a refused envelope's signature is checked like a receive's"
    half = _seal(B, A, 0, 2)
    log.append("refused", B.peer_id_text, "ack", round=0, envelope_sig=half.signature.hex(), reason="BAD_ROUND: x")
    forged = _seal(OTHER, A, 0, 3)
    log.append(
        "refused",
        B.peer_id_text,
        "ack",
        round=0,
        payload_digest=forged.header.payload_digest.hex(),
        size=forged.size,
        envelope_sig=forged.signature.hex(),
        reason="BAD_ROUND: x",
        envelope_header=forged.header_bytes,
    )
    store.close()
    assert _found(tmp_path) == {(3, "header"), (4, "envelope")}


def test_verify_chain_still_accepts_entries_with_headers(log_a: Path) -> None:
    store = Store(log_a)
    entries = AuditLog(store, None).entries()
    store.close()
    assert verify_chain(entries, A.public_key) == []


# -- the format, re-implemented from docs/AUDIT.md ---------------------------------------


def test_entry_hash_signature_and_head_follow_the_documented_encoding(log_a: Path) -> None:
    log = load_log(log_a)
    prev = GENESIS
    for e in log.entries:
        values = [
            e[f]
            for f in (
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
        ]
        values = ["" if v is None else v for v in values] + ([e["envelope_header"]] if e["envelope_header"] else [])
        h = hashlib.blake2b(DOMAIN + msgpack.packb(values), digest_size=32).hexdigest()
        assert h == e["entry_hash"] and e["prev_hash"] == prev
        nacl.signing.VerifyKey(A.public_key).verify(bytes.fromhex(h), bytes.fromhex(e["signature"]))
        prev = h
    head = log.checkpoints[-1]
    leaves = [hashlib.sha256(b"\x00" + bytes.fromhex(e["entry_hash"])).digest() for e in log.entries]
    assert tree_root(leaves).hex() == head.root_hash
    signed = CHECKPOINT_DOMAIN + msgpack.packb([A.peer_id_text, head.size, head.at_ms, head.root_hash])
    nacl.signing.VerifyKey(A.public_key).verify(signed, bytes.fromhex(head.signature))


def test_entry_without_header_hashes_as_the_eleven_field_v1_encoding() -> None:
    entry = {
        "seq": 1,
        "at_ms": 5,
        "direction": "refused",
        "peer": "p",
        "round": -1,
        "kind": "connection",
        "payload_digest": "",
        "size": 0,
        "envelope_sig": "",
        "reason": "untrusted",
        "prev_hash": GENESIS,
        "envelope_header": None,
    }
    packed = msgpack.packb([1, 5, "refused", "p", -1, "connection", "", 0, "", "untrusted", GENESIS])
    assert entry_hash(entry) == hashlib.blake2b(DOMAIN + packed, digest_size=32).hexdigest()


def test_worked_example_of_docs_audit_md_hashes_as_documented() -> None:
    peer = "12D3KooWLztejyQ6NDrf1rB3S95LjUAR4xUAcqMf9j9MLUzzmHS9"
    entry = {
        "seq": 1,
        "at_ms": 1_700_000_000_000,
        "direction": "refused",
        "peer": peer,
        "round": -1,
        "kind": "connection",
        "payload_digest": "",
        "size": 0,
        "envelope_sig": "",
        "reason": "not in the trust list",
        "prev_hash": GENESIS,
        "envelope_header": None,
    }
    assert entry_hash(entry) == "8d1c35bb113b4e28830c300a9e56440f2be3e7b4f01947ba3caa25c1338e0f2b"
    assert AUDIT_MD.is_file() and entry_hash(entry) in AUDIT_MD.read_text()


def _reference_verifier() -> Callable[[Path], list[tuple[int | None, str]]]:
    """The 'Reference verifier' code block of docs/AUDIT.md, executed as written."""
    text = AUDIT_MD.read_text()
    block = text[text.index("## Reference verifier") :]
    code = block[block.index("```python") + len("```python") : block.index("```", block.index("```python") + 3)]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/AUDIT.md", "exec"), namespace)  # the example in our own docs, not untrusted input
    return namespace["verify"]


def test_reference_verifier_in_the_docs_agrees_with_verify_log(log_a: Path, tmp_path: Path) -> None:
    verify = _reference_verifier()
    assert verify(log_a) == []
    tampered = tmp_path / "t" / "store.sqlite"
    tampered.parent.mkdir()
    shutil.copy(log_a, tampered)
    _sql(tampered, ("UPDATE audit SET size = size + 1 WHERE seq = 6", []), ("DELETE FROM audit WHERE seq > 14", []))
    assert {n for n, _ in verify(tampered) if n is not None} == {6, 15}
    assert {e for e, _ in _found(tampered) if e is not None} == {6, 15}


def test_store_of_schema_1_migrates_and_its_header_less_entries_are_reported(tmp_path: Path) -> None:
    import sqlite_utils

    from silomesh.peer.store import MIGRATIONS

    path = tmp_path / "store.sqlite"
    db = sqlite_utils.Database(path)
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version=1")
    prev = GENESIS
    for seq in (1, 2):  # written by the schema-1 code: no header column, 11-field hash
        sealed = _seal(B, A, 0, seq)
        row = {
            "seq": seq,
            "at_ms": 1000 + seq,
            "direction": "received",
            "peer": B.peer_id_text,
            "round": 0,
            "kind": "ack",
            "payload_digest": sealed.header.payload_digest.hex(),
            "size": sealed.size,
            "envelope_sig": sealed.signature.hex(),
            "reason": "",
            "prev_hash": prev,
        }
        packed = msgpack.packb([row[f] for f in row])
        row["entry_hash"] = prev = hashlib.blake2b(DOMAIN + packed, digest_size=32).hexdigest()
        row["signature"] = A.signing_key.sign(bytes.fromhex(prev)).signature.hex()
        db.table("audit").insert(row)
    db.close()
    store = Store(path)
    log = AuditLog(store, A.signing_key)
    _record(log, "received", B, _seal(B, A, 1, 3))
    log.checkpoint()
    store.close()
    report = verify_log(load_log(path))
    # the 11-value entries still chain and carry the writer's signatures; only the headers are missing
    assert {(f.entry, f.code) for f in report.findings} == {(1, "header"), (2, "header")}
    assert report.envelope_signatures_checked == 1
    assert verify_chain(load_log(path).entries, A.public_key) == []


# -- checkpoints ----------------------------------------------------------------------


def test_checkpoint_signs_each_new_size_once_and_survives_a_rolled_back_round(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    log = AuditLog(store, A.signing_key)
    assert log.checkpoint() is None  # empty log
    for i in range(3):
        log.append("sent", B.peer_id_text, "hello", round=0, payload_digest=f"{i:064x}")
    first = log.checkpoint()
    assert first is not None and first.size == 3 and first.verify()
    assert log.checkpoint() is None  # nothing new
    with pytest.raises(RuntimeError), store.atomic():
        log.append("sent", B.peer_id_text, "hello", round=1)
        log.checkpoint()
        raise RuntimeError("crash while committing the round")
    log.append("sent", B.peer_id_text, "ack", round=1)
    head = log.checkpoint()
    assert head is not None and head.size == 4
    hashes = [leaf_hash(bytes.fromhex(e["entry_hash"])) for e in log.entries()]
    assert head.root_hash == tree_root(hashes).hex()
    assert [h.size for h in log.heads()] == [3, 4]
    assert store.get_state("audit_writer") == {"peer_id": A.peer_id_text, "public_key": A.public_key.hex()}
    store.close()


def test_tree_head_signature_covers_every_field() -> None:
    head = TreeHead(A.peer_id_text, 4, "ab" * 32, 1000)
    signed = TreeHead(
        head.peer_id, head.size, head.root_hash, head.at_ms, A.signing_key.sign(head.signed_bytes()).signature.hex()
    )
    assert signed.verify() and TreeHead.from_json(signed.to_json()) == signed
    for field, value in (("size", 5), ("root_hash", "cd" * 32), ("at_ms", 1001), ("peer_id", B.peer_id_text)):
        assert not TreeHead(**{**signed.__dict__, field: value}).verify()


def test_head_prints_the_latest_signed_head_and_counts_what_follows_it(log_a: Path) -> None:
    result = _cli("head", log_a)
    assert result.exit_code == 0 and result.stderr == ""
    assert TreeHead.from_json(json.loads(result.stdout)) == load_log(log_a).checkpoints[-1]
    assert json.loads(result.stdout)["size"] == 16
    store = Store(log_a)
    log = AuditLog(store, A.signing_key)
    log.append("refused", B.peer_id_text, "connection", reason="untrusted-connection")
    log.append("refused", B.peer_id_text, "connection", reason="untrusted-connection")
    result = _cli("head", log_a)
    assert json.loads(result.stdout)["size"] == 16  # stdout stays the head alone: safe to redirect and keep
    assert "entries 17-18 are not covered by a signed head yet" in result.stderr
    log.checkpoint()  # what the peer does within 60 s, or at once when it stops
    store.close()
    result = _cli("head", log_a)
    assert json.loads(result.stdout)["size"] == 18 and result.stderr == ""
    assert json.loads(_cli("head", log_a, "--size", "8").stdout)["size"] == 8
    listed = _cli("head", log_a, "--list")
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["4", "8", "12", "16", "18"]
    assert _cli("head", log_a, "--size", "5").exit_code == 2


# -- proofs ---------------------------------------------------------------------------


def test_inclusion_proof_verifies_against_the_signed_head_and_fails_when_altered(log_a: Path, tmp_path: Path) -> None:
    log = load_log(log_a)
    head = log.checkpoints[-1]
    for seq in (1, 6, 16):
        assert check_inclusion(inclusion(log, seq), head) == []
    proof = inclusion(log, 6, size=12)
    assert check_inclusion(proof, head) != []  # a proof under head 12 is not one under head 16
    assert check_inclusion(proof, log.checkpoints[2]) == []
    altered_path = {**proof, "audit_path": [("0" * 64), *proof["audit_path"][1:]]}
    altered_entry = {**proof, "entry": {**proof["entry"], "size": proof["entry"]["size"] + 1}}
    other_entry = {**proof, "entry": log.entries[6]}
    for bad in (altered_path, altered_entry, other_entry):
        assert check_inclusion(bad, log.checkpoints[2])
    forged_head = TreeHead(head.peer_id, head.size, head.root_hash, head.at_ms + 1, head.signature)
    assert "does not verify" in " ".join(check_inclusion(inclusion(log, 6), forged_head))

    proof_file, head_file = tmp_path / "proof.json", tmp_path / "head.json"
    proof_file.write_text(_cli("prove", log_a, "6").output)
    head_file.write_text(_cli("head", log_a).output)
    result = _cli("verify-proof", proof_file, "--head", head_file)
    assert result.exit_code == 0 and result.output.startswith("OK: entry 6"), result.output
    assert _cli("verify-proof", proof_file, "--head", head_file, "--key", B.public_key.hex()).exit_code == 1
    obj = json.loads(proof_file.read_text())
    obj["entry"]["payload_digest"] = "00" * 32
    proof_file.write_text(json.dumps(obj))
    code, out = _cli_json("verify-proof", proof_file, "--head", head_file)
    assert code == 1 and "the entry's content does not match its hash" in out["problems"]


def test_prove_an_entry_not_under_a_signed_head_is_exit_2(log_a: Path) -> None:
    store = Store(log_a)
    AuditLog(store, A.signing_key).append("sent", B.peer_id_text, "hello")
    store.close()
    result = _cli("prove", log_a, "17")
    assert result.exit_code == 2 and "not covered" in result.output


def test_consistency_proof_between_heads_verifies_and_fails_when_altered(log_a: Path, tmp_path: Path) -> None:
    log = load_log(log_a)
    for first, second in ((4, 16), (8, 12), (4, 4)):
        assert check_consistency(consistency(log, first, second)) == []
    proof = consistency(log, 4, 16)
    assert check_consistency({**proof, "proof": list(reversed(proof["proof"]))})
    assert check_consistency({**proof, "first": {**proof["first"], "root_hash": "00" * 32}})
    swapped = {**proof, "first": proof["second"], "second": proof["first"]}
    assert check_consistency(swapped)
    with pytest.raises(AuditError, match="no checkpoint of size 5"):
        consistency(log, 5)

    kept = tmp_path / "head8.json"
    kept.write_text(_cli("head", log_a, "--size", "8").output)
    out = tmp_path / "consistency.json"
    out.write_text(_cli("consistency", log_a, "--from", "8", "--to", "16").output)
    result = _cli("verify-consistency", out, "--first", kept)
    assert result.exit_code == 0, result.output
    other = tmp_path / "head4.json"
    other.write_text(_cli("head", log_a, "--size", "4").output)
    assert _cli("verify-consistency", out, "--first", other).exit_code == 1

    # a rewritten history: entry 2 re-signed by A itself (a writer covering its tracks)
    row = _row(log_a, 2)
    row["reason"] = "rewritten"
    row["entry_hash"] = entry_hash(row)
    row["signature"] = A.signing_key.sign(bytes.fromhex(row["entry_hash"])).signature.hex()
    _sql(
        log_a,
        (
            "UPDATE audit SET reason = ?, entry_hash = ?, signature = ? WHERE seq = 2",
            [row["reason"], row["entry_hash"], row["signature"]],
        ),
    )
    rewritten = load_log(log_a)
    leaves = [leaf_hash(bytes.fromhex(e["entry_hash"])) for e in rewritten.entries]
    assert tree_root(leaves[:8]).hex() != json.loads(kept.read_text())["root_hash"]
    found = {(f.entry, f.code) for f in verify_log(rewritten).findings}
    assert (3, "link") in found and (None, "checkpoint") in found


# -- show / export ----------------------------------------------------------------------


def test_show_filters_and_prints_who_sent_what_to_whom(log_a: Path) -> None:
    result = _cli("show", log_a, "--round", "2", "--direction", "received")
    assert result.exit_code == 0
    assert "2 of 16 entries" in result.output and B.peer_id_text[-8:] in result.output
    code, out = _cli_json("show", log_a, "--peer", B.peer_id_text[-12:], "--kind", "ack", "--direction", "sent")
    assert code == 0 and len(out["entries"]) == 8
    assert all(e["direction"] == "sent" and e["peer"] == B.peer_id_text for e in out["entries"])


def test_csv_export_has_one_row_per_entry(log_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.csv"
    assert _cli("export", log_a, "--format", "csv", "--out", out).exit_code == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("seq,at_ms,direction,peer,round,kind,payload_digest,size")
    assert len(lines) == 17


# -- reconcile (two synthetic logs; tests/test_audit_peers.py does it with real peers) -------


def test_reconcile_matches_every_send_to_its_receive(pristine: tuple[Path, Path]) -> None:
    report = reconcile([load_log(p) for p in pristine])
    assert report.ok and report.matched == 16 and report.unchecked_sends == 0
    result = CliRunner().invoke(audit, ["reconcile", *map(str, pristine)])
    assert result.exit_code == 0 and result.output.startswith("OK: 2 logs, 16 sends matched")


def test_reconcile_reports_signature_mismatch_and_receive_without_send(
    pristine: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    shutil.copy(pristine[0], a)
    shutil.copy(pristine[1], b)
    # B's entry 1 is A's first send (A's entry 1); B's entry 3 is A's second send (A's entry 3)
    _sql(b, ("UPDATE audit SET envelope_sig = ? WHERE seq = 1", ["11" * 64]))
    _sql(a, ("DELETE FROM audit WHERE seq = 3", []))
    report = reconcile([load_log(a), load_log(b)])
    got = {(d.code, d.sender, d.sender_entry, d.recipient_entry) for d in report.discrepancies}
    assert got == {
        ("signature-mismatch", A.peer_id_text, 1, 1),
        ("unmatched-receive", A.peer_id_text, None, 3),
    }
    code, out = _cli_json("reconcile", a, b)
    assert code == 1 and len(out["discrepancies"]) == 2


def _refuse(log: AuditLog, other: PeerIdentity, sealed: SealedEnvelope, reason: str) -> None:
    """What the peer writes for a message it declined after it authenticated (one entry, header kept)."""
    log.append(
        "refused",
        other.peer_id_text,
        "ack",
        round=sealed.header.round,
        payload_digest=sealed.header.payload_digest.hex(),
        size=sealed.size,
        envelope_sig=sealed.signature.hex(),
        reason=reason,
        envelope_header=sealed.header_bytes,
    )


def test_reconcile_matches_a_send_to_its_refusal_and_lists_it_apart(tmp_path: Path) -> None:
    stores = {p.peer_id_text: Store(tmp_path / name / "store.sqlite") for p, name in ((A, "a"), (B, "b"))}
    a, b = (AuditLog(stores[p.peer_id_text], p.signing_key) for p in (A, B))
    kept, declined, doubled, unsent = (_seal(A, B, 0, n) for n in (1, 2, 3, 4))
    for sealed in (kept, declined, doubled):
        _record(a, "sent", B, sealed)
    _record(b, "received", A, kept)
    _refuse(b, A, declined, "STATE_MISMATCH: the update does not produce the state_digest it announced")
    _record(b, "received", A, doubled)  # received, then refused: the same envelope, twice recorded
    _refuse(b, A, doubled, "BAD_SHAPE: x")
    _refuse(b, A, unsent, "BAD_ROUND: x")  # A signed it but never recorded sending it
    for store in stores.values():
        store.close()
    report = reconcile([load_log(tmp_path / "a"), load_log(tmp_path / "b")])
    assert report.matched == 3
    assert [(x.sender_entry, x.recipient_entry, x.reason.split(":")[0], x.also_received) for x in report.refused] == [
        (2, 2, "STATE_MISMATCH", False),
        (3, 4, "BAD_SHAPE", True),
    ]
    assert [(d.code, d.recipient_entry) for d in report.discrepancies] == [("unmatched-receive", 5)]
    assert "refused (BAD_ROUND: x)" in report.discrepancies[0].detail
    result = _cli("reconcile", tmp_path / "a", tmp_path / "b")
    assert result.exit_code == 1
    assert "2 sends refused by their recipient" in result.output and "STATE_MISMATCH" in result.output
    code, out = _cli_json("reconcile", tmp_path / "a", tmp_path / "b")
    assert code == 1 and [x["recipient_entry"] for x in out["refused"]] == [2, 4]


def test_reconcile_refuses_two_logs_of_one_writer(pristine: tuple[Path, Path]) -> None:
    result = CliRunner().invoke(audit, ["reconcile", str(pristine[0]), str(pristine[0])])
    assert result.exit_code == 2 and "both written by" in result.output
