"""Operator features against running peers, under trio's MockClock.

Approvals (participation ``manual``), model versions (list, rename, delete, export,
import), dataset registration and its announce, and neighbour selection, all through
the :class:`~silomesh.peer.operator.Operator` methods the control API calls. The peers
are production peers over the in-memory transport (``tests/memnet.py``) with torch work
inline, so every wait below is in virtual time: exact and instant. The same features
over libp2p and the real clock are covered by test_dashboard_*.py and test_control.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
import trio
from memnet import MemoryNetwork, StartTogether
from peerkit import TINY_CATHETER, configs, write_png_folder
from safetensors.numpy import load_file
from safetensors.numpy import save as save_safetensors

from silomesh.peer.context import InlineCompute
from silomesh.peer.daemon import Peer
from silomesh.peer.operator import OperatorError

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    """Every test here runs under an autojumping MockClock."""


#: bound on each test's virtual time: far beyond any deadline used here
VIRTUAL_LIMIT = 600.0


@asynccontextmanager
async def running(peers: list[Peer]) -> AsyncIterator[None]:
    """Start ``peers``, run the body while they serve, then stop them (bounded, virtual time)."""
    with trio.fail_after(VIRTUAL_LIMIT):
        async with trio.open_nursery() as nursery:
            for p in peers:
                await nursery.start(p.run)
            yield
            nursery.cancel_scope.cancel()


async def eventually(check: Callable[[], Awaitable[T]]) -> T:
    """Wait until ``check`` returns something truthy (virtual time: costs nothing real).

    The operator sees approvals and announces only through the Operator interface, which
    has no event to wait on; under the MockClock this poll is exact and instant.
    """
    with trio.fail_after(VIRTUAL_LIMIT):
        while not (result := await check()):  # noqa: ASYNC110 - a virtual-time poll of the Operator interface
            await trio.sleep(0.05)
    return result


def pending(peer: Peer, kind: str) -> Callable[[], Awaitable[list[dict[str, Any]]]]:
    async def check() -> list[dict[str, Any]]:
        return [a for a in await peer.operator.approvals() if a["kind"] == kind and a["status"] == "pending"]

    return check


def make_peers(
    tmp_path: Path, *, participation: list[str], net: MemoryNetwork | None = None, **kwargs: Any
) -> list[Peer]:
    ids, cfgs = configs(tmp_path, 2, **kwargs)
    cfgs = [dataclasses.replace(c, participation=p) for c, p in zip(cfgs, participation, strict=True)]
    net = net or MemoryNetwork()
    start = StartTogether(net, len(cfgs))
    return [
        Peer(c, identity=i, serve_control_api=False, transport=net.open, compute=InlineCompute(), faults=start)
        for i, c in zip(ids, cfgs, strict=True)
    ]


# -- approvals ------------------------------------------------------------------------


async def test_manual_round_waits_for_approval_and_a_declined_round_is_recorded(tmp_path: Path) -> None:
    peers = make_peers(tmp_path, participation=["manual", "manual"], rounds=2, deadline=30.0)
    a, b = peers
    async with running(peers):
        asks = {p.peer_id: (await eventually(pending(p, "round")))[0] for p in peers}
        for p in peers:
            assert asks[p.peer_id]["round"] == 0
            assert await p.operator.rounds() == []  # nothing ran before consent
            assert (await p.operator.status())["phase"] == "waiting-approval"
        for p in peers:
            decided = await p.operator.decide(asks[p.peer_id]["id"], True)
            assert decided["status"] == "approved" and decided["decided_at"]
        with pytest.raises(OperatorError) as again:
            await a.operator.decide(asks[a.peer_id]["id"], False)
        assert again.value.status == 409
        with pytest.raises(OperatorError) as unknown:
            await a.operator.decide(10_000, True)
        assert unknown.value.status == 404

        round1 = {p.peer_id: (await eventually(pending(p, "round")))[0] for p in peers}
        assert all(r["round"] == 1 for r in round1.values())
        for p in peers:
            declined = await p.operator.decide(round1[p.peer_id]["id"], False)
            assert declined["status"] == "declined"
        for p in peers:
            await p.done.wait()
        seen = {p.peer_id: (await p.operator.rounds(), await p.operator.models()) for p in peers}
    for p, other in ((a, b), (b, a)):
        rounds, models = seen[p.peer_id]
        assert [(r["round"], r["status"]) for r in rounds] == [(0, "done"), (1, "declined")]
        assert rounds[0]["contributors"] == [other.peer_id]
        assert [m["round"] for m in models] == [0]  # a declined round trains and keeps nothing


async def test_manual_peer_asks_before_training_a_neighbours_model_and_decline_skips_it(
    tmp_path: Path,
) -> None:
    requester, trainer = peers = make_peers(
        tmp_path, participation=["auto", "manual"], rounds=1, deadline=30.0, strategy="fedefm"
    )
    async with running(peers):
        ask = (await eventually(pending(trainer, "train-request")))[0]
        assert ask["peer"] == requester.peer_id and ask["round"] == 0
        assert await requester.operator.rounds() == []  # the requester's round waits for the answer
        own_round = (await eventually(pending(trainer, "round")))[0]
        await trainer.operator.decide(own_round["id"], False)
        await trainer.operator.decide(ask["id"], False)
        await requester.done.wait()
        rounds = await requester.operator.rounds()
        audit = requester.audit_log.entries()
    assert [(r["round"], r["status"]) for r in rounds] == [(0, "done")]
    assert rounds[0]["contributors"] == []
    assert [s["peer"] for s in rounds[0]["skipped"]] == [trainer.peer_id]
    assert ("received", "error") in {(e["direction"], e["kind"]) for e in audit}
    assert not any(e["kind"] == "train-result" for e in audit)


async def test_requests_left_pending_by_a_stopped_or_killed_peer_expire_at_restart(tmp_path: Path) -> None:
    from silomesh.peer.store import Store

    ids, cfgs = configs(tmp_path, 2, participation="manual", rounds=1)
    net = MemoryNetwork()

    def alone() -> Peer:  # its neighbour never starts
        return Peer(cfgs[0], identity=ids[0], serve_control_api=False, transport=net.open, compute=InlineCompute())

    first = alone()
    async with running([first]):
        stopped = (await eventually(pending(first, "round")))[0]
    store = Store(cfgs[0].store)  # what a peer killed while waiting leaves behind
    store.db["approvals"].insert(
        {"kind": "train-request", "round": 0, "peer": ids[1].peer_id_text, "status": "pending", "created_at": 0.0}
    )
    store.close()

    again = alone()
    async with running([again]):
        fresh = (await eventually(pending(again, "round")))[0]
        rows = await again.operator.approvals()
        with pytest.raises(OperatorError) as late:
            await again.operator.decide(stopped["id"], True)
        assert late.value.status == 409
    assert fresh["id"] != stopped["id"] and fresh["round"] == 0
    assert [a["status"] for a in rows] == ["expired", "expired", "pending"]


# -- models ---------------------------------------------------------------------------


async def test_models_are_listed_per_round_renamed_exported_imported_and_deleted(tmp_path: Path) -> None:
    peers = make_peers(tmp_path, participation=["auto", "auto"], rounds=2)
    peer = peers[0]
    async with running(peers):
        for p in peers:
            await p.done.wait()
        models = await peer.operator.models()
        assert [m["round"] for m in models] == [0, 1]
        assert models[0]["parent"] is None and models[1]["parent"] == models[0]["digest"]
        first, last = models[0]["digest"], models[1]["digest"]

        # rename, by digest prefix; the name then works as a reference; names are unique
        renamed = await peer.operator.rename_model(last[:10], "baseline")
        assert renamed["digest"] == last and renamed["name"] == "baseline"
        with pytest.raises(OperatorError) as clash:
            await peer.operator.rename_model(first, "baseline")
        assert clash.value.status == 409
        with pytest.raises(OperatorError) as missing:
            await peer.operator.rename_model("no-such-model", "x")
        assert missing.value.status == 404

        # export: safetensors is the stored file; pt is a plain state dict torch can load safely
        stored = load_file(str(await peer.operator.export_model("baseline", "safetensors")))
        assert set(stored) == set(peer.learner.shapes)
        pt = await peer.operator.export_model("baseline", "pt")
        loaded = torch.load(pt, weights_only=True)
        assert isinstance(loaded, dict) and set(loaded) == set(stored)
        for k, v in stored.items():
            assert isinstance(loaded[k], torch.Tensor)
            assert torch.equal(loaded[k], torch.from_numpy(v)), k
        with pytest.raises(OperatorError):
            await peer.operator.export_model("baseline", "onnx")

        # import: a valid file of the right shapes becomes a model version; bad ones are refused
        new = {k: (v + np.float32(0.01)).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in stored.items()}
        imported = await peer.operator.import_model(save_safetensors(new), "pretrained.safetensors")
        assert imported["origin"] == "import:pretrained.safetensors"
        assert imported["digest"] in {m["digest"] for m in await peer.operator.models()}
        back = load_file(str(await peer.operator.export_model(imported["digest"], "safetensors")))
        assert all(np.array_equal(back[k], new[k]) for k in new)

        name, value = next((k, v) for k, v in stored.items() if v.ndim >= 2)
        wrong_shape = {**stored, name: np.zeros((*value.shape[:-1], value.shape[-1] + 1), value.dtype)}
        nan = {**stored, name: np.full_like(value, np.nan)}
        missing_tensor = {k: v for k, v in stored.items() if k != name}
        for bad, why in ((wrong_shape, "shape"), (nan, "NaN"), (missing_tensor, "missing")):
            with pytest.raises(OperatorError, match=why):
                await peer.operator.import_model(save_safetensors(bad), "bad.safetensors")
        with pytest.raises(OperatorError, match=r"garbage\.bin"):
            await peer.operator.import_model(b"\x00garbage, not a safetensors file", "garbage.bin")
        assert len(await peer.operator.models()) == 3  # refused imports left nothing behind

        # delete: the weights file goes, the listing and references forget it
        file = await peer.operator.export_model(first, "safetensors")
        assert file.exists()
        deleted = await peer.operator.delete_model(first)
        assert deleted["deleted"] is True and deleted["digest"] == first
        assert not file.exists()
        assert first not in {m["digest"] for m in await peer.operator.models()}
        with pytest.raises(OperatorError) as gone:
            await peer.operator.export_model(first, "pt")
        assert gone.value.status == 404
        with pytest.raises(OperatorError):
            await peer.operator.delete_model(first)


# -- datasets -------------------------------------------------------------------------


async def test_registering_a_bad_dataset_folder_fails_naming_the_file(tmp_path: Path) -> None:
    peers = make_peers(tmp_path, participation=["auto", "auto"], rounds=1)
    hospital = peers[0]
    size = TINY_CATHETER["image_size"]
    bad = write_png_folder(tmp_path / "broken", 3, size)
    (bad / "images" / "s1.png").write_bytes(b"not a png at all")
    odd = write_png_folder(tmp_path / "odd", 2, size)
    from PIL import Image

    Image.fromarray(np.zeros((size, size + 2), np.uint8)).save(odd / "masks" / "s0.png")
    async with running(peers):
        with pytest.raises(OperatorError, match=r"s1\.png"):
            await hospital.operator.register_dataset(str(bad))
        with pytest.raises(OperatorError, match=r"masks/s0.png"):
            await hospital.operator.register_dataset(str(odd))
        with pytest.raises(OperatorError, match="absent"):
            await hospital.operator.register_dataset(str(tmp_path / "absent"))
        assert await hospital.operator.datasets() == []


async def test_registered_dataset_is_announced_to_the_neighbour(tmp_path: Path) -> None:
    peers = make_peers(tmp_path, participation=["auto", "auto"], rounds=1)
    hospital, neighbour = peers
    size = TINY_CATHETER["image_size"]
    good = write_png_folder(tmp_path / "xray", 5, size)
    async with running(peers):
        for p in peers:
            await p.done.wait()  # connected, announce topic meshed

        record = await hospital.operator.register_dataset(str(good))
        manifest = record["manifest"]
        assert manifest["count"] == 5 and manifest["label_kind"] == "mask"
        assert manifest["image_shape"] == [1, size, size]
        assert [d["path"] for d in await hospital.operator.datasets()] == [str(good)]

        async def announced() -> dict[str, Any] | None:
            rows = {r["peer_id"]: r for r in await neighbour.operator.neighbours()}
            row = rows[hospital.peer_id]
            return row if row.get("samples") == 5 else None

        row = await eventually(announced)
    assert row is not None and row["data_digest"] == manifest["digest"]


# -- neighbour selection --------------------------------------------------------------


async def test_round_after_deselecting_every_neighbour_has_no_contributors(tmp_path: Path) -> None:
    peers = make_peers(tmp_path, participation=["manual", "manual"], rounds=1, deadline=10.0)
    a, b = peers
    async with running(peers):
        ask = (await eventually(pending(a, "round")))[0]
        with pytest.raises(OperatorError) as unknown:
            await a.operator.select_neighbours(["12D3KooWNotTrustedAtAll"])
        assert unknown.value.status == 404
        rows = await a.operator.select_neighbours([])
        assert [(r["peer_id"], r["selected"]) for r in rows] == [(b.peer_id, False)]
        await a.operator.decide(ask["id"], True)
        await b.operator.decide((await eventually(pending(b, "round")))[0]["id"], False)
        await a.done.wait()
        rounds = await a.operator.rounds()
        audit = a.audit_log.entries()
    assert [(r["round"], r["status"]) for r in rounds] == [(0, "done")]
    assert rounds[0]["contributors"] == [] and rounds[0]["skipped"] == []
    assert not [e for e in audit if e["direction"] == "sent" and e["kind"] == "update"]
