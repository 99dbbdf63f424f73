"""The signed study manifest: canonical form, signature, tampering, and the peer's gate.

Unit tests pin the canonical JSON and the digest (computed here by hand), show that any
changed field gives another digest and that a changed file no longer verifies. Peer
tests run real peers over the in-memory transport under MockClock: a peer trains nothing
before its operator approved the study, and a neighbour of another study is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from memnet import MemoryNetwork
from peerkit import configs, identity
from test_round_loop import Timeline, running

from silomesh.peer.audit import AuditLog
from silomesh.peer.config import PeerConfig, StudyConfig
from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.identity import PeerIdentity
from silomesh.peer.operator import OperatorError
from silomesh.peer.store import Store
from silomesh.peer.study import STUDY_APPROVED_KIND, StudyGate, config_differences, manifest_for, study_refusal
from silomesh.protocol import Identity
from silomesh.protocol.study import (
    DIGEST_DOMAIN,
    SignedStudy,
    StudyError,
    StudyManifest,
    hello_model,
    read_study,
    split_hello_model,
)

ALICE, BOB, CAROL = (identity(n) for n in ("alice", "bob", "carol"))


def manifest(**changes: Any) -> StudyManifest:
    fields: dict[str, Any] = {
        "name": "cardio-2026",
        "version": 1,
        "federation": "test-fed",
        "task": "catheter",
        "model": "catheter/tiny",
        "strategy": "fedavg",
        "strategy_params": {"weighting": "samples"},
        "rounds": {"count": 3, "local_steps": 5, "batch_size": 8, "lr": 0.001},
        "privacy": None,
        "members": tuple(sorted((ALICE.peer_id_text, BOB.peer_id_text))),
    }
    return StudyManifest(**{**fields, **changes})


def signer(who: PeerIdentity) -> Identity:
    return Identity.from_seed(who.seed)


# -- canonical form and digest -----------------------------------------------------------


def test_canonical_form_is_sorted_compact_json_and_the_digest_is_blake2b_over_it() -> None:
    m = manifest()
    a, b = m.members
    expected = (
        '{"federation":"test-fed","format":"silomesh-study/1","members":["' + a + '","' + b + '"],'
        '"name":"cardio-2026","privacy":null,'
        '"rounds":{"batch_size":8,"count":3,"local_steps":5,"lr":0.001},'
        '"strategy":{"name":"fedavg","params":{"weighting":"samples"}},'
        '"task":{"model":"catheter/tiny","name":"catheter"},"version":1}'
    ).encode()
    assert m.canonical() == expected
    assert m.digest == hashlib.blake2b(b"silomesh/study/v1\x00" + expected, digest_size=32).digest()
    assert DIGEST_DOMAIN == b"silomesh/study/v1\x00"


@pytest.mark.parametrize(
    "change",
    [
        {"name": "cardio-2027"},
        {"version": 2},
        {"federation": "other-fed"},
        {"task": "organs"},
        {"model": "catheter/small"},
        {"strategy": "fedmix"},
        {"strategy_params": {"weighting": "uniform"}},
        {"rounds": {"count": 4, "local_steps": 5, "batch_size": 8, "lr": 0.001}},
        {"rounds": {"count": 3, "local_steps": 5, "batch_size": 8, "lr": 0.002}},
        {"privacy": {"target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": None,
                     "planned_steps": 15}},
        {"members": tuple(sorted((ALICE.peer_id_text, BOB.peer_id_text, CAROL.peer_id_text)))},
    ],
    ids=lambda c: next(iter(c)),
)
def test_changing_any_field_gives_another_digest(change: dict[str, Any]) -> None:
    assert manifest(**change).digest != manifest().digest


def test_members_must_be_sorted_unique_peer_ids() -> None:
    with pytest.raises(StudyError, match=r"manifest\.members: must be sorted"):
        manifest(members=tuple(sorted((ALICE.peer_id_text, BOB.peer_id_text)))[::-1])
    with pytest.raises(StudyError, match=r"manifest\.members: must be sorted"):
        manifest(members=(ALICE.peer_id_text, ALICE.peer_id_text))
    with pytest.raises(StudyError, match=r"manifest.members\[0\]"):
        manifest(members=("not-a-peer-id",))


def test_a_value_json_cannot_hold_is_refused_naming_the_field() -> None:
    with pytest.raises(StudyError, match=r"manifest\.strategy\.params\.mu: nan is not a finite number"):
        manifest(strategy_params={"mu": float("nan")})


# -- the signed file ---------------------------------------------------------------------


def test_a_signed_study_file_reads_back_with_the_same_digest() -> None:
    signed = manifest().sign(signer(ALICE))
    again = read_study(signed.to_bytes())
    assert again.digest == signed.digest
    assert again.proposer == ALICE.peer_id_text
    assert again.manifest == signed.manifest


@pytest.mark.parametrize(
    "path, value",
    [
        (("rounds", "count"), 30),
        (("strategy", "params", "weighting"), "uniform"),
        (("privacy",), {"target_epsilon": 30.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": None,
                        "planned_steps": 15}),
        (("task", "model"), "catheter/small"),
    ],
)
def test_a_field_changed_in_the_file_after_signing_fails_the_signature(path: tuple[str, ...], value: object) -> None:
    doc = json.loads(manifest().sign(signer(ALICE)).to_bytes())
    target = doc["manifest"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(StudyError, match="signature: does not verify"):
        read_study(json.dumps(doc).encode())


def test_a_study_signed_by_a_non_member_or_by_another_key_is_refused() -> None:
    with pytest.raises(StudyError, match="is not a member"):
        manifest().sign(signer(CAROL))
    m = manifest()
    forged = SignedStudy(m, ALICE.peer_id_text, signer(BOB).sign(b"silomesh/study-signature/v1\x00" + m.digest))
    with pytest.raises(StudyError, match="signature: does not verify"):
        read_study(forged.to_bytes())


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x80\x04pickle", "not a JSON study file"),
        (b'{"manifest": {}, "proposer": "x"}', "study.signature: required field is missing"),
        (b'{"manifest": {}, "proposer": "x", "signature": "00", "extra": 1}', "study.extra: unknown field"),
        (b'{"manifest": {"format": "x"}, "proposer": "x", "signature": "00"}', "manifest.name: required field"),
    ],
)
def test_a_malformed_study_file_is_refused_naming_what_is_wrong(data: bytes, match: str) -> None:
    with pytest.raises(StudyError, match=match):
        read_study(data)


def test_the_hello_model_carries_the_study_digest_after_the_model_id() -> None:
    digest = manifest().digest
    assert hello_model("catheter/tiny", digest) == "catheter/tiny@" + digest.hex()
    assert split_hello_model(hello_model("catheter/tiny", digest)) == ("catheter/tiny", digest.hex())
    assert split_hello_model("organs/BasicUNet/1f0c9a5e3b7d2c44") == ("organs/BasicUNet/1f0c9a5e3b7d2c44", "")


# -- the peer's side ---------------------------------------------------------------------


def study_configs(tmp_path: Path, n: int = 2, **kwargs: Any) -> tuple[list[PeerIdentity], list[PeerConfig]]:
    return configs(tmp_path, n, rounds=2, deadline=30.0, **kwargs)


def write_study(path: Path, config: PeerConfig, ids: list[PeerIdentity], version: int = 1) -> SignedStudy:
    signed = manifest_for(config, name="cardio-2026", version=version, members=[i.peer_id_text for i in ids]).sign(
        signer(ids[0])
    )
    path.write_bytes(signed.to_bytes())
    return signed


def with_study(config: PeerConfig, path: Path) -> PeerConfig:
    return dataclasses.replace(config, study=StudyConfig(path))


def make_peers(cfgs: list[PeerConfig], ids: list[PeerIdentity], net: MemoryNetwork) -> list[Peer]:
    timeline = Timeline(net, len(cfgs))
    return [Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(),
                 faults=timeline) for i, c in zip(ids, cfgs, strict=True)]


def test_config_differences_name_each_field_that_differs_and_non_member_neighbours(tmp_path: Path) -> None:
    ids, cfgs = study_configs(tmp_path, 3)
    signed = write_study(tmp_path / "study.json", cfgs[0], ids[:2])
    assert config_differences(cfgs[0], signed, ids[0].peer_id_text) == [
        f"trusted[1].peer_id: {ids[2].peer_id_text} (p2) is not a member of the study"
    ]
    other = dataclasses.replace(cfgs[1], rounds=dataclasses.replace(cfgs[1].rounds, count=5))
    assert config_differences(other, signed, ids[1].peer_id_text) == [
        f"trusted[1].peer_id: {ids[2].peer_id_text} (p2) is not a member of the study",
        "rounds.count: study 2, here 5",
    ]
    assert config_differences(cfgs[2], signed, ids[2].peer_id_text)[0].startswith("members: this peer")


def test_a_peer_whose_config_differs_from_its_study_does_not_start(tmp_path: Path) -> None:
    ids, cfgs = study_configs(tmp_path)
    write_study(tmp_path / "study.json", cfgs[0], ids)
    changed = dataclasses.replace(cfgs[1], strategy=dataclasses.replace(cfgs[1].strategy, name="fedmix"))
    with pytest.raises(OperatorError, match=r'strategy\.name: study "fedavg", here "fedmix"'):
        Peer(with_study(changed, tmp_path / "study.json"), identity=ids[1], serve_control_api=False)


async def test_a_peer_trains_nothing_until_its_operator_approves_the_study(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ids, cfgs = study_configs(tmp_path)
    signed = write_study(tmp_path / "study.json", cfgs[0], ids)
    net = MemoryNetwork()
    a, b = peers = make_peers([with_study(c, tmp_path / "study.json") for c in cfgs], ids, net)
    async with running(peers):
        await trio.sleep(600.0)  # twenty round deadlines
        for p in peers:
            assert p.phase == "waiting-study-approval"
            assert await p.operator.rounds() == []
            assert (await p.operator.status())["study"]["approved"] is False
        with pytest.raises(OperatorError) as wrong:
            await a.operator.approve_study(manifest().digest.hex())
        assert wrong.value.status == 409
        for p in peers:
            assert (await p.operator.approve_study(signed.digest_hex))["approved"] is True
        with trio.fail_after(600):
            await a.done.wait()
            await b.done.wait()
        seen = {p.peer_id: await p.operator.rounds() for p in peers}
        logs = {p.peer_id: p.audit_log.entries() for p in peers}
    for p, other in ((a, b), (b, a)):
        assert [r["status"] for r in seen[p.peer_id]] == ["done", "done"]
        assert all(r["contributors"] == [other.peer_id] for r in seen[p.peer_id])
        (approval,) = [e for e in logs[p.peer_id] if e["kind"] == STUDY_APPROVED_KIND]
        assert (approval["direction"], approval["payload_digest"]) == ("local", signed.digest_hex)


async def test_a_neighbour_running_another_study_is_refused_and_audited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ids, cfgs = study_configs(tmp_path)
    first = write_study(tmp_path / "v1.json", cfgs[0], ids, version=1)
    second = write_study(tmp_path / "v2.json", cfgs[0], ids, version=2)  # same fields, new version: new digest
    net = MemoryNetwork()
    a, b = peers = make_peers(
        [with_study(cfgs[0], tmp_path / "v1.json"), with_study(cfgs[1], tmp_path / "v2.json")], ids, net
    )
    async with running(peers):
        await a.operator.approve_study(first.digest_hex)
        await b.operator.approve_study(second.digest_hex)
        with trio.fail_after(600):
            await a.done.wait()
            await b.done.wait()
        seen = {p.peer_id: await p.operator.rounds() for p in peers}
        entries = [e for p in peers for e in p.audit_log.entries()]
    for p in peers:
        assert all(r["contributors"] == [] for r in seen[p.peer_id])
    refusals = [e for e in entries if e["direction"] == "refused" and e["kind"] == "hello"]
    assert refusals and all("REFUSED: study differs" in e["reason"] for e in refusals)
    assert any(first.digest_hex[:12] in e["reason"] and second.digest_hex[:12] in e["reason"] for e in refusals)


def test_study_refusal_covers_no_study_another_study_a_non_member_and_no_approval(tmp_path: Path) -> None:
    ids, cfgs = study_configs(tmp_path)
    signed = write_study(tmp_path / "study.json", cfgs[0], ids)
    ours = hello_model("catheter/tiny", signed.digest)
    store = Store(tmp_path / "store.sqlite")
    try:
        gate = StudyGate(signed, AuditLog(store, ids[0].signing_key))
        member, stranger = ids[1].peer_id_text, CAROL.peer_id_text
        assert "study differs" in (study_refusal(None, member, ours) or "")
        assert "the neighbour names no study" in (study_refusal(gate, member, "catheter/tiny") or "")
        assert "not approved" in (study_refusal(gate, member, ours) or "")
        gate.approve(signed.digest_hex)
        assert study_refusal(gate, member, ours) is None
        assert "is not a member" in (study_refusal(gate, stranger, ours) or "")
        assert study_refusal(None, member, "catheter/tiny") is None  # no study on either side: as before
        # a restarted peer finds its operator's approval in its audit log
        assert StudyGate(signed, AuditLog(store, ids[0].signing_key)).approved
        other = write_study(tmp_path / "v2.json", cfgs[0], ids, version=2)
        assert not StudyGate(other, AuditLog(store, ids[0].signing_key)).approved
    finally:
        store.close()


# -- the command line --------------------------------------------------------------------


def test_study_create_then_show_reviews_the_file_and_names_a_field_the_peer_toml_changed(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from silomesh.cli import cli
    from silomesh.peer.identity import write_key_file

    me = write_key_file(tmp_path / "peer.key")
    toml = (
        'federation = "test-fed"\nkey_file = "peer.key"\n'
        '[task]\nname = "catheter"\nsize = "tiny"\n'
        '[rounds]\ncount = {count}\n'
        f'[[trusted]]\npeer_id = "{BOB.peer_id_text}"\naddress = "/ip4/127.0.0.1/tcp/4002"\n'
    )
    (tmp_path / "peer.toml").write_text(toml.replace("{count}", "4"))
    runner = CliRunner()
    config = ["--config", str(tmp_path / "peer.toml")]
    created = runner.invoke(cli, ["study", "create", "--name", "cardio-2026", "--out", str(tmp_path / "s.json"),
                                  *config])
    assert created.exit_code == 0, created.output
    signed = read_study((tmp_path / "s.json").read_bytes())
    assert signed.proposer == me.peer_id_text
    assert signed.manifest.members == tuple(sorted((me.peer_id_text, BOB.peer_id_text)))
    again = runner.invoke(cli, ["study", "create", "--name", "x", "--out", str(tmp_path / "s.json"), *config])
    assert again.exit_code != 0 and "never overwritten" in again.output

    shown = runner.invoke(cli, ["study", "show", str(tmp_path / "s.json"), *config])
    assert shown.exit_code == 0, shown.output
    assert signed.digest_hex in shown.output and "signature verified" in shown.output
    assert "matches the study" in shown.output

    (tmp_path / "peer.toml").write_text(toml.replace("{count}", "5"))
    differs = runner.invoke(cli, ["study", "show", str(tmp_path / "s.json"), *config])
    assert differs.exit_code == 1
    assert "rounds.count: study 4, here 5" in differs.output


def test_a_study_section_without_its_manifest_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    from silomesh.peer.config import ConfigError, parse_config

    base = {"federation": "test-fed", "key_file": "peer.key"}
    assert parse_config(base, tmp_path).study.manifest is None
    assert parse_config({**base, "study": {"manifest": "s.json"}}, tmp_path).study.manifest == tmp_path / "s.json"
    with pytest.raises(ConfigError, match=r"^study\.manifest: required field is missing"):
        parse_config({**base, "study": {}}, tmp_path)
    with pytest.raises(ConfigError, match=r"^study\.file: unknown field"):
        parse_config({**base, "study": {"file": "s.json"}}, tmp_path)
