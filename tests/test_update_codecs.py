"""Update codecs: ``[rounds] codec`` float16 / int8 / int4 / topk, with error feedback.

A lossy delta is made against what the neighbour decoded of the previous one, so the
quantization error (or, under topk, the values left out) of a round is carried into the
next delta instead of piling up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
import trio
import trio.testing
from memnet import MemoryNetwork
from test_exchange_path import make
from test_round_loop import running

from silomesh.peer import rounds as rounds_module
from silomesh.peer.config import ConfigError, PeerConfig, load_config
from silomesh.peer.context import Base
from silomesh.peer.daemon import Peer
from silomesh.peer.dialer import UpdateMaker
from silomesh.peer.rounds import consensus_view
from silomesh.protocol import Codec, apply_delta, make_delta, state_digest
from silomesh.protocol.codec import keep_largest, received_as
from silomesh.strategies import StateDict


def test_received_as_is_what_a_receiver_decodes() -> None:
    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=(64, 3)).astype(np.float32), "n": np.arange(4, dtype=np.int64)}
    exact = received_as(state, Codec.FLOAT32)
    assert np.array_equal(exact["w"], state["w"]) and np.array_equal(exact["n"], state["n"])
    q = received_as(state, Codec.INT8)
    step = float(np.abs(state["w"]).max()) / 127
    assert q["w"].dtype == np.float32 and 0 < np.abs(q["w"] - state["w"]).max() <= step / 2 + 1e-7
    assert np.array_equal(q["n"], state["n"])  # integer tensors travel unchanged
    assert q["w"].flags.writeable


def test_error_feedback_keeps_the_receivers_copy_within_one_step_of_quantization() -> None:
    """Twenty rounds of small changes sent as int8 deltas: against what the receiver holds
    (feedback), its copy stays within half a quantization step of the last delta; against the
    sender's own previous state (no feedback), the errors add up."""
    rng = np.random.default_rng(1)
    truth = {"w": rng.normal(size=4096).astype(np.float32)}
    held = received_as(truth, Codec.INT8)  # an int8 snapshot first
    naive = dict(held)
    previous = truth
    for _ in range(20):
        new = {"w": (previous["w"] + rng.normal(scale=0.01, size=4096)).astype(np.float32)}
        delta = make_delta(new, held)
        held = apply_delta(held, received_as(delta, Codec.INT8))
        naive = apply_delta(naive, received_as(make_delta(new, previous), Codec.INT8))
        bound = float(np.abs(delta["w"]).max()) / 127 / 2 + 1e-6
        assert float(np.abs(held["w"] - new["w"]).max()) <= bound
        previous = new
    assert float(np.abs(naive["w"] - previous["w"]).max()) > 3 * float(np.abs(held["w"] - previous["w"]).max())


def test_a_bad_codec_in_peer_toml_is_refused(tmp_path: Path) -> None:
    (tmp_path / "peer.toml").write_text(
        'federation = "f"\nkey_file = "k"\nlisten = "/ip4/127.0.0.1/tcp/1"\n'
        '[task]\nname = "catheter"\n[rounds]\ncodec = "int2"\n'
    )
    with pytest.raises(ConfigError, match=r"rounds\.codec"):
        load_config(tmp_path / "peer.toml")


def _sent_codecs(peer: Peer) -> list[str]:
    """The header codec of every update ``peer`` sent, from its audit log."""
    return [msgpack.unpackb(bytes.fromhex(e["envelope_header"]))["codec"] for e in peer.store.audit_entries()
            if e["direction"] == "sent" and e["kind"] == "update"]


async def _two_peers(
    tmp_path: Path, codecs: tuple[str, str], inspect: Callable[[list[Peer]], None] | None = None
) -> tuple[list[list[dict[str, object]]], list[list[str]]]:
    """Two neighbours set to ``codecs``, three rounds: each peer's rounds and the codecs of the
    updates it sent (``inspect`` sees the peers before they stop)."""
    table = {"count": 3, "deadline_seconds": 30.0, "local_steps": 3, "batch_size": 8}

    def set_codec(i: int, cfg: PeerConfig) -> PeerConfig:
        return dataclasses.replace(cfg, rounds=dataclasses.replace(cfg.rounds, codec=codecs[i]))

    peers = make(tmp_path, 2, MemoryNetwork(), adjust=set_codec, extra={"rounds": table})
    async with running(peers):
        for p in peers:
            await p.done.wait()
        rounds = [await p.operator.rounds() for p in peers]
        sent = [_sent_codecs(p) for p in peers]
        if inspect is not None:
            inspect(peers)
    return rounds, sent


def _bytes(rounds: list[dict[str, object]]) -> int:
    return sum(int(r["bytes_sent"]) for r in rounds)


async def test_two_peers_exchange_int8_updates_a_quarter_of_the_bytes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Every update travels as int8 (snapshot and deltas): the receivers' digest checks pass
    (each round has its neighbour's model), and the bytes are about a quarter of float32's."""

    def check_maker(peers: list[Peer]) -> None:
        # a neighbour whose hello lists no int8 is sent float32
        ctx = peers[0].context
        maker = UpdateMaker(ctx, 9, ctx.learner.shared(ctx.learner.state()), {}, "int8")
        recipient = ctx.trust.public_key_of(peers[1].peer_id)
        assert maker._make(recipient, None, ("float32",)).message.codec is Codec.FLOAT32
        out = maker._make(recipient, None, ("float32", "int8"))
        assert out.message.codec is Codec.INT8 and out.result.digest == state_digest(out.result.state)
        base = Base(out.result.digest, out.result.state)
        delta = maker._make(recipient, base, ("int8",))
        assert delta.message.base_digest == base.digest and delta.message.codec is Codec.INT8

    rounds: dict[str, list[dict[str, object]]] = {}
    headers: dict[str, list[str]] = {}
    for codec in ("float32", "int8"):
        both, sent = await _two_peers(tmp_path / codec, (codec, codec), check_maker if codec == "int8" else None)
        rounds[codec], headers[codec] = both[0], sent[0]
    for codec in rounds:
        assert [r["status"] for r in rounds[codec]] == ["done"] * 3
        assert all(len(r["contributors"]) == 1 for r in rounds[codec]), rounds[codec]
    assert set(headers["float32"]) == {"float32"} and set(headers["int8"]) == {"int8"}
    ratio = _bytes(rounds["int8"]) / _bytes(rounds["float32"])
    assert 0.24 < ratio < 0.35, ratio


async def test_two_peers_exchange_int4_deltas_after_an_int8_snapshot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Under int4 the first update of a neighbour is an int8 snapshot and the next are int4
    deltas (the receivers' digest checks pass: each round has its neighbour's model); only an
    int4 peer lists int4 in its hello; a neighbour that does not list it gets int8 if it
    lists int8, float32 otherwise."""

    def check_maker(peers: list[Peer]) -> None:
        ctx = peers[0].context
        maker = UpdateMaker(ctx, 9, ctx.learner.shared(ctx.learner.state()), {}, "int4")
        recipient = ctx.trust.public_key_of(peers[1].peer_id)
        codecs = ("float32", "int8", "int4")
        assert maker._make(recipient, None, ("float32", "float16")).message.codec is Codec.FLOAT32
        out = maker._make(recipient, None, codecs)  # a snapshot: int8
        assert out.message.codec is Codec.INT8
        base = Base(out.result.digest, out.result.state)
        assert maker._make(recipient, base, ("float32", "float16")).message.codec is Codec.FLOAT32
        # a neighbour that decodes int8 but not int4 (it is not set to int4) gets int8 deltas
        assert maker._make(recipient, base, ("float32", "int8")).message.codec is Codec.INT8
        delta = maker._make(recipient, base, codecs)
        assert delta.message.codec is Codec.INT4 and delta.result.digest == state_digest(delta.result.state)

    rounds: dict[str, list[dict[str, object]]] = {}
    headers: dict[str, list[str]] = {}
    for codec in ("float32", "int4"):

        def inspect(peers: list[Peer], codec: str = codec) -> None:
            assert ("int4" in peers[0].context.endpoint.hello(b"\0" * 32).codecs) is (codec == "int4")
            if codec == "int4":
                check_maker(peers)

        both, sent = await _two_peers(tmp_path / codec, (codec, codec), inspect)
        rounds[codec], headers[codec] = both[0], sent[0]
    for codec in rounds:
        assert [r["status"] for r in rounds[codec]] == ["done"] * 3
        assert all(len(r["contributors"]) == 1 for r in rounds[codec]), rounds[codec]
    assert headers["int4"][0] == "int8" and set(headers["int4"][1:]) == {"int4"}, headers["int4"]
    ratio = _bytes(rounds["int4"]) / _bytes(rounds["float32"])
    assert 0.12 < ratio < 0.24, ratio


async def test_a_peer_set_to_int4_sends_int8_to_a_neighbour_set_to_int8(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Two live peers, one set to int4 and one to int8: the int8 peer's hello lists no int4,
    so the int4 peer sends it int8 (snapshot and deltas), and both rounds complete with the
    receivers' digest checks passing."""
    rounds, sent = await _two_peers(tmp_path, ("int4", "int8"))
    for r in rounds:
        assert [x["status"] for x in r] == ["done"] * 3 and all(len(x["contributors"]) == 1 for x in r), r
    assert sent[0] and set(sent[0]) == {"int8"}, sent[0]  # the int4 peer, to its int8 neighbour
    assert sent[1] and set(sent[1]) == {"int8"}, sent[1]


# ---------------------------------------------------------------- topk


def test_topk_settings_are_checked(tmp_path: Path) -> None:
    def load(extra: str, codec: str = "topk") -> PeerConfig:
        (tmp_path / "peer.toml").write_text(
            'federation = "f"\nkey_file = "k"\nlisten = "/ip4/127.0.0.1/tcp/1"\n'
            f'[task]\nname = "catheter"\n[rounds]\ncodec = "{codec}"\n{extra}'
        )
        return load_config(tmp_path / "peer.toml")

    assert load("").rounds.consensus_step == pytest.approx(0.2)  # 2 x the default share 0.1
    assert load("topk = 0.05\n").rounds.consensus_step == pytest.approx(0.1)
    assert load("topk = 0.5\n").rounds.consensus_step == 1.0
    assert load("topk = 0.1\ntopk_step = 0.7\n").rounds.consensus_step == 0.7
    for bad, key in (("topk = 0.0", "topk"), ("topk = 0.6", "topk"), ("topk_step = 0.0", "topk_step"),
                     ("topk_step = 1.5", "topk_step")):
        with pytest.raises(ConfigError, match=rf"rounds\.{key}:"):
            load(bad + "\n")
    # set under another codec they would change nothing: refused, not ignored
    for codec in ("float32", "int4"):
        for key in ("topk = 0.2", "topk_step = 0.5"):
            with pytest.raises(ConfigError, match=rf'rounds\.{key.split()[0]}: applies only with codec = "topk"'):
                load(f"{key}\n", codec)
    # strategies whose rounds do not average their neighbours' models refuse it
    for strategy in ('name = "cyclic"', 'name = "fedefm"', 'name = "fedavg"\nparams = { reduce = "tree" }'):
        with pytest.raises(ConfigError, match=r"rounds\.codec: topk"):
            load(f"[strategy]\n{strategy}\n")


def _ring_of_topk_gossip(step: float | None, share: float = 0.1, rounds: int = 300) -> tuple[float, float]:
    """Four models on a ring, no training: every round each sends its neighbours a top-k
    delta against what they hold of it (error feedback) and averages (a third each) either
    the consensus views (``step``) or, with ``step=None``, what it holds of them as it is.
    Returns how far the models' mean moved from the start and how far apart they end."""
    rng = np.random.default_rng(0)
    models = [{"w": (rng.normal(size=200) + i).astype(np.float32)} for i in range(4)]
    held = [received_as(m, Codec.INT8) for m in models]  # the first update: an int8 snapshot
    start = np.mean([m["w"] for m in models], axis=0)
    for _ in range(rounds):
        for i, m in enumerate(models):
            held[i] = apply_delta(held[i], received_as(keep_largest(make_delta(m, held[i]), share), Codec.TOPK))
        views = [[held[j] if step is None else consensus_view(held[j], models[i], Base(b"", held[i]), step)
                  for j in ((i - 1) % 4, (i + 1) % 4)] for i in range(4)]
        models = [{"w": (models[i]["w"] + views[i][0]["w"] + views[i][1]["w"]) / 3} for i in range(4)]
    mean = np.mean([m["w"] for m in models], axis=0)
    return float(np.abs(mean - start).max()), max(float(np.abs(m["w"] - mean).max()) for m in models)


def test_topk_gossip_keeps_the_mean_with_consensus_views_and_agrees_with_the_default_step() -> None:
    """Why the consensus views, and why a step below 1: averaging what a neighbour holds of
    the others as if it were their models moves the federation's mean (the values not sent
    yet are averaged away); the views keep it, and with the default step (2 x the share kept)
    the models agree, while with step 1 they drift apart."""
    moved, apart = _ring_of_topk_gossip(step=0.2)
    assert moved < 1e-3 and apart < 1e-3, (moved, apart)
    plain_moved, _ = _ring_of_topk_gossip(step=None)
    assert plain_moved > 0.1, plain_moved
    _, apart_at_one = _ring_of_topk_gossip(step=1.0, rounds=60)
    assert apart_at_one > 10, apart_at_one


def test_a_consensus_view_is_their_model_when_they_hold_all_of_ours() -> None:
    ours = {"w": np.array([1.0, 2.0], np.float32), "n": np.array([3])}
    theirs = {"w": np.array([5.0, -1.0], np.float32), "n": np.array([4])}
    assert consensus_view(theirs, ours, None, 0.5) is theirs  # no base of ours there yet
    full = consensus_view(theirs, ours, Base(b"", dict(ours)), 1.0)
    assert full["w"].tolist() == [5.0, -1.0] and full["n"] is theirs["n"]
    half = consensus_view(theirs, ours, Base(b"", {"w": np.array([1.0, 0.0], np.float32)}), 0.5)
    assert half["w"].tolist() == [1.0 + 0.5 * 4.0, 2.0 + 0.5 * -1.0]
    # float64 models keep their precision (in float32 all three are 1.0 and the step is lost)
    mine, base, their = (np.array([1.0 + k * 1e-12]) for k in (3, 1, 2))
    moved = consensus_view({"w": their}, {"w": mine}, Base(b"", {"w": base}), 0.5)["w"]
    assert moved.dtype == np.float64 and moved[0] == mine[0] + 0.5 * (their[0] - base[0]) != 1.0


@pytest.fixture
def views(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per consensus view an exchange round made."""
    made: list[int] = []

    def counted(theirs: StateDict, ours: StateDict, held: Base | None, step: float) -> StateDict:
        made.append(1)
        return consensus_view(theirs, ours, held, step)

    monkeypatch.setattr(rounds_module, "consensus_view", counted)
    return made


async def test_two_peers_exchange_topk_deltas_after_an_int8_snapshot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, views: list[int]
) -> None:
    """Under topk the first update of a neighbour is an int8 snapshot and the next are topk
    deltas keeping a tenth of each tensor's values (the receivers' digest checks pass); only a
    topk peer lists topk in its hello; a neighbour that does not list it gets int8. The
    neighbour's model counts through a consensus view once it holds topk deltas of ours
    (rounds 2 and 3 of both peers), not after the snapshot."""

    def inspect(peers: list[Peer]) -> None:
        ctx = peers[0].context
        assert "topk" in ctx.endpoint.hello(b"\0" * 32).codecs
        assert ctx.bases.sparse == {peers[1].peer_id} and peers[1].context.bases.sparse == {peers[0].peer_id}
        maker = UpdateMaker(ctx, 9, ctx.learner.shared(ctx.learner.state()), {}, "topk")
        recipient = ctx.trust.public_key_of(peers[1].peer_id)
        codecs = ("float32", "int8", "topk")
        out = maker._make(recipient, None, codecs)
        assert out.message.codec is Codec.INT8  # a snapshot
        base = Base(out.result.digest, out.result.state)
        assert maker._make(recipient, base, ("float32", "int8")).message.codec is Codec.INT8
        delta = maker._make(recipient, base, codecs)
        assert delta.message.codec is Codec.TOPK and delta.result.digest == state_digest(delta.result.state)
        for name, value in delta.message.tensors.items():
            if value.dtype.kind == "f":
                assert np.count_nonzero(value) <= -(-value.size // 10), name

    rounds, sent = await _two_peers(tmp_path, ("topk", "topk"), inspect)
    assert len(views) == 4
    float32, _ = await _two_peers(tmp_path / "float32", ("float32", "float32"))
    assert len(views) == 4
    for r in rounds:
        assert [x["status"] for x in r] == ["done"] * 3 and all(len(x["contributors"]) == 1 for x in r), r
    assert sent[0][0] == "int8" and set(sent[0][1:]) == {"topk"}, sent[0]
    ratio = _bytes(rounds[0]) / _bytes(float32[0])
    assert 0.15 < ratio < 0.3, ratio


async def test_a_topk_peer_averages_a_neighbour_not_set_to_topk_plainly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, views: list[int]
) -> None:
    """A topk peer and an int8 one exchange int8 both ways, so each holds all of the other's
    model: no consensus views (they would pull the pair towards the topk peer, five to one at
    the default step, instead of to its mean)."""

    def inspect(peers: list[Peer]) -> None:
        assert peers[0].context.bases.sparse == set() == peers[1].context.bases.sparse
        assert set(peers[0].context.bases.acked) == {peers[1].peer_id}

    rounds, sent = await _two_peers(tmp_path, ("topk", "int8"), inspect)
    for r in rounds:
        assert [x["status"] for x in r] == ["done"] * 3 and all(len(x["contributors"]) == 1 for x in r), r
    assert set(sent[0]) == set(sent[1]) == {"int8"}, sent
    assert views == []
