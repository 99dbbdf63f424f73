"""Hospitals as separate hosts in network namespaces: NAT, relays, links that go down.

Each hospital is its own namespace with its own address, ``silomesh peer run`` process
and store (tests/netbed.py). Two are behind separate NAT routers that drop every inbound
connection. These tests need root, ``ip``, ``tc`` and ``nft`` (``make net-deps``); they
skip with the reason when one is missing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netbed import Hospital, NetBed, missing_requirements, open_netbed, stop_processes
from peerkit import TINY_CATHETER

from silomesh.peer.identity import load_key_file, write_key_file

_MISSING = missing_requirements()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"network test bed unavailable: {_MISSING}")

PORT = 4001


@pytest.fixture
def bed() -> Iterator[NetBed]:
    with open_netbed() as b:
        yield b


def test_nat_router_lets_connections_out_and_none_in(bed: NetBed) -> None:
    a = bed.add_public("a")
    b = bed.add_natted("b")
    bed.add_natted("c")
    listeners = [
        subprocess.Popen(bed.command(n, [sys.executable, "-c", _LISTENER])) for n in ("a", "b", "c")
    ]
    try:
        time.sleep(0.5)
        assert bed.can_connect("b", a.address, PORT)  # out through the NAT
        assert not bed.can_connect("a", b.public_address, PORT)  # no inbound port
        assert not bed.can_connect("a", b.address, PORT)  # the LAN address is not routed
        assert not bed.can_connect("c", b.public_address, PORT)  # NAT to NAT: nothing
        bed.link_down("b")
        assert not bed.can_connect("b", a.address, PORT, timeout=1)
        bed.link_up("b")
        assert bed.can_connect("b", a.address, PORT)
    finally:
        for p in listeners:
            p.kill()
            p.wait()


_LISTENER = (
    "import socket, time\n"
    f"s = socket.socket(); s.bind(('0.0.0.0', {PORT})); s.listen()\n"
    "while True:\n    c, _ = s.accept(); c.close()\n"
)


def test_bed_removes_its_namespaces(tmp_path: Path) -> None:
    with open_netbed() as b:
        b.add_natted("x")
        made = list(b.namespaces)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert made and not any(ns in listed for ns in made), listed


# --------------------------------------------------------------------------- real peers


def _hospitals(root: Path, names: list[str]) -> dict[str, Hospital]:
    out = {}
    for n in names:
        d = root / n
        d.mkdir()
        out[n] = Hospital(n, d, write_key_file(d / "peer.key").peer_id_text)
    return out


def _write_config(
    h: Hospital,
    index: int,
    n: int,
    trusted: dict[str, tuple[str, str]],
    *,
    relay: str = "",
    deadline: float = 20,
    rounds: int = 3,
    network: str = "",
    size: str = "tiny",
) -> None:
    options = ", ".join(f"{k} = {v}" for k, v in {**TINY_CATHETER, "silos": n, "silo": index, "seed": 0}.items())
    entries = "".join(
        f'\n[[trusted]]\nname = "{name}"\npeer_id = "{peer_id}"\naddress = "{address}"\n'
        for name, (peer_id, address) in trusted.items()
    )
    h.config.write_text(
        f"""federation = "netbed"
key_file = "peer.key"
listen = "/ip4/0.0.0.0/tcp/{PORT}"
data_dir = "state"

[task]
name = "catheter"
size = "{size}"
options = {{ {options} }}

[rounds]
count = {rounds}
deadline_seconds = {deadline}
local_steps = 2
batch_size = 8

{network}
{relay}
{entries}"""
    )


def _start(bed: NetBed, site: str, h: Hospital) -> None:
    log = (h.dir / "peer.log").open("wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    h.proc = subprocess.Popen(
        bed.command(site, [sys.executable, "-m", "silomesh.peer.cli", "-v", "peer", "run", "--config", str(h.config)]),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _stop(hospitals: list[Hospital]) -> None:
    stop_processes((h.proc for h in hospitals), wait=30)


def _rounds(h: Hospital) -> list[dict[str, Any]]:
    if not h.store.exists():
        return []
    try:
        with sqlite3.connect(f"file:{h.store}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT round, status, contributors, bytes_sent FROM rounds ORDER BY round").fetchall()
    except sqlite3.OperationalError:
        return []
    return [{"round": r, "status": s, "contributors": json.loads(c) if c else [], "bytes_sent": b}
            for r, s, c, b in rows]


def _wait(what: str, check: Any, timeout: float, hospitals: list[Hospital]) -> None:  # noqa: ANN401
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        for h in hospitals:
            if h.proc is not None and h.proc.poll() is not None:
                raise AssertionError(f"{h.name} exited with {h.proc.returncode}: {_tail(h)}")
        time.sleep(0.5)
    latest = "; ".join(f"{h.name} {_rounds(h)[-6:]}" for h in hospitals)
    raise AssertionError(f"timed out waiting for {what}: {latest}")


def _tail(h: Hospital, lines: int = 30) -> str:
    path = h.dir / "peer.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _doctor(bed: NetBed, site: str, h: Hospital) -> dict[str, Any]:
    proc = subprocess.run(
        bed.command(site, [sys.executable, "-m", "silomesh.peer.cli", "doctor", "--json", "--config", str(h.config)]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def _link(bed: NetBed, site: str, h: Hospital, neighbour: str) -> dict[str, Any]:
    """What the running peer at ``site`` reports about its link to ``neighbour`` (doctor --json)."""
    return next(nb for nb in _doctor(bed, site, h)["neighbours"] if nb["name"] == neighbour)


def _circuit(relay_site_address: str, relay_id: str) -> str:
    return f"/ip4/{relay_site_address}/tcp/{PORT}/p2p/{relay_id}/p2p-circuit"


@pytest.mark.slow
# Until silomesh.peer.muxer turned on batched Yamux window updates, this test failed (it was
# an expected failure): relay-only in 12 of 12 runs on an idle machine, with DCUtR now and
# then under load. The per-read window updates of py-libp2p 0.8.1 made the relay's
# connections carry 57-76-byte segments until the relay could not keep up
# (docs/NETWORK-NOTES.md, "Relay-only: the cause").
@pytest.mark.parametrize("hole_punch", [True, False], ids=["dcutr", "relay-only"])
def test_four_hospitals_two_behind_nat_reach_everyone_through_a_relay(
    bed: NetBed, tmp_path: Path, hole_punch: bool
) -> None:
    """A (public, relays), D (public), B and C behind separate NATs with no inbound port.

    B and C dial A and D themselves (the connection is used both ways) and reach each other
    through A's relay; with DCUtR on, that relayed link is upgraded to a direct TCP
    connection punched through both NATs, with it off the rounds run over the relay. Every
    round includes all four; the audit logs reconcile; doctor on each hospital reports the
    kind of every link.
    """
    sites = {"a": bed.add_public("a"), "b": bed.add_natted("b"), "c": bed.add_natted("c"), "d": bed.add_public("d")}
    hs = _hospitals(tmp_path, list(sites))
    ids = {n: h.peer_id for n, h in hs.items()}
    direct = {n: f"/ip4/{s.public_address}/tcp/{PORT}" for n, s in sites.items()}
    via_a = _circuit(sites["a"].address, ids["a"])
    relay_client = f'[relay]\nvia = ["{direct["a"]}/p2p/{ids["a"]}"]\nhole_punch = {str(hole_punch).lower()}\n'
    # who reaches whom, as each hospital's peer.toml says it
    plans = {
        "a": ({m: direct[m] for m in "bcd"}, "[relay]\nserve = true\n"),
        "d": ({m: direct[m] for m in "abc"}, ""),
        "b": ({"a": direct["a"], "d": direct["d"], "c": via_a}, relay_client),
        "c": ({"a": direct["a"], "d": direct["d"], "b": via_a}, relay_client),
    }
    for i, (n, h) in enumerate(hs.items()):
        trusted, relay = plans[n]
        # The default 20 s deadline. Under a load average of 6-7 on 2 cores (other jobs), rounds
        # over the relayed link missed it: too few full rounds in time, or an abandoned message
        # that the audit logs cannot match (docs/NETWORK-NOTES.md). A longer deadline made each
        # missed round longer and did not help.
        _write_config(h, i, 4, {m: (ids[m], addr) for m, addr in trusted.items()}, relay=relay, rounds=0)
    everyone = list(hs.values())

    def full(n: str) -> list[int]:
        """Rounds ``n`` committed with all three neighbours' models in them."""
        others = {ids[m] for m in hs if m != n}
        return [r["round"] for r in _rounds(hs[n]) if r["status"] == "done" and set(r["contributors"]) >= others]

    try:
        for n, h in hs.items():
            _start(bed, n, h)
        # A round does not wait for a neighbour that is not up yet, so the first rounds may
        # miss one while the four processes start; once all links are up, every round has all.
        _wait("3 rounds with all neighbours at every hospital", lambda: all(len(full(n)) >= 3 for n in hs), 170,
              everyone)
        reports = {n: _doctor(bed, n, h) for n, h in hs.items()}
        # TCP connections of B: an upgraded link to C is a real TCP connection to C's NAT router
        b_sockets = bed.exec_quiet(sites["b"].ns, ["ss", "-Htn", "state", "established"])
    finally:
        _stop(everyone)

    kinds = {
        (n, nb["name"]): nb["connection"] for n, report in reports.items() for nb in report["neighbours"]
    }
    for n, report in reports.items():
        assert all(nb["connected"] for nb in report["neighbours"]), (n, report)
        failed = [c for c in report["checks"] if c["status"] == "fail"]
        assert not failed, (n, failed)
    rtts = {(n, nb["name"]): nb["rtt_ms"] for n, report in reports.items() for nb in report["neighbours"]}
    print("connection kinds:", kinds, "round trips (ms):", rtts)  # shown with pytest -s
    natted = {("b", "c"), ("c", "b")}
    for pair, kind in kinds.items():
        if pair in natted:
            assert kind == ("upgraded" if hole_punch else "relayed"), (pair, kind)
            # "upgraded" must be true: a direct TCP connection through both NATs (DCUtR's hole punch)
            assert (kind == "upgraded") == (f"{sites['c'].public_address}:" in b_sockets), (kind, b_sockets)
        else:
            assert kind == "direct", (pair, kind, kinds)
    # a NATed hospital's reservation on A's relay, and its reachability as its neighbours see it
    for n in "bc":
        relay_checks = [c for c in reports[n]["checks"] if c["name"] == "relay"]
        assert relay_checks and all(c["status"] == "ok" for c in relay_checks), reports[n]["checks"]
    reach = {n: next(c for c in r["checks"] if c["name"] == "reachable") for n, r in reports.items()}
    assert "cannot dial us directly" in reach["b"]["detail"], reach
    assert "can dial us" in reach["a"]["detail"], reach

    for n, h in hs.items():
        rounds = _rounds(h)
        assert rounds and all(r["status"] == "done" for r in rounds[:-1]), (n, rounds)  # the last may be cut by stop
        last = full(n)[-3:]
        assert last == list(range(last[0], last[0] + 3)), (n, rounds)  # consecutive full rounds
    reconcile = subprocess.run(
        [sys.executable, "-m", "silomesh.cli", "audit", "reconcile", "--json", *(str(h.store) for h in everyone)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    result = json.loads(reconcile.stdout)
    # The four run rounds until stopped, so the round in flight at the stop may be cut
    # mid-exchange, or committed by one hospital without another that had already stopped.
    # Before every link is up, a link may also change under a message (a relayed connection
    # that DCUtR upgrades, a reservation that is renewed): seen once, an ack sent in round 0
    # over the B-C link was never recorded by B. The rounds every hospital ran with all its
    # neighbours must form an unbroken run of at least three that reaches the last round all
    # four committed or the one before it, and over that run the logs must reconcile exactly.
    last_committed = min(max(r["round"] for r in _rounds(h) if r["status"] == "done") for h in everyone)
    everyone_full = set.intersection(*(set(full(n)) for n in hs))
    settled = max(everyone_full, default=-1)
    linked = settled
    while linked - 1 in everyone_full:  # the unbroken run of rounds every hospital ran with all
        linked -= 1
    assert result["matched"] > 0 and result["unchecked_sends"] == 0, result
    assert settled >= last_committed - 1 and settled - linked >= 2, (linked, settled, last_committed,
                                                                     sorted(everyone_full))
    assert [d for d in result["discrepancies"] if linked <= d["round"] <= settled] == [], result["discrepancies"]
    print("reconcile:", result["matched"], "matched; outside rounds", linked, "to", settled, ":",
          [(d["code"], d["kind"], d["round"]) for d in result["discrepancies"]])
    for h in everyone:
        assert load_key_file(h.dir / "peer.key").peer_id_text == h.peer_id


_IMPATIENT = (
    "[network]\nhello_timeout_seconds = 3\nstall_timeout_seconds = 3\nreply_timeout_seconds = 4\n"
    "ping_interval_seconds = 2\n"
)


@pytest.mark.slow
def test_link_down_longer_than_the_deadline_costs_one_neighbour_rounds_not_the_run(
    bed: NetBed, tmp_path: Path
) -> None:
    """C's WAN link goes down for longer than the round deadline: A and B finish rounds
    without C; once the link is back, C is dialled again (with backoff) and rounds include it."""
    sites = {"a": bed.add_public("a"), "b": bed.add_public("b"), "c": bed.add_public("c")}
    hs = _hospitals(tmp_path, list(sites))
    ids = {n: h.peer_id for n, h in hs.items()}
    for i, (n, h) in enumerate(hs.items()):
        trusted = {m: (ids[m], f"/ip4/{sites[m].address}/tcp/{PORT}") for m in hs if m != n}
        # a neighbour silent for 3 s is dropped and redialled (with backoff) instead of waited for
        _write_config(h, i, 3, trusted, deadline=6, rounds=0, network=_IMPATIENT)
    everyone = list(hs.values())
    a = hs["a"]

    def done_rounds(h: Hospital) -> list[dict[str, Any]]:
        return [r for r in _rounds(h) if r["status"] == "done"]

    try:
        for n, h in hs.items():
            _start(bed, n, h)
        _wait("a first round with everyone", lambda: any(
            ids["c"] in r["contributors"] and ids["b"] in r["contributors"] for r in done_rounds(a)), 90, everyone)
        bed.link_down("c")
        cut_at = max(r["round"] for r in done_rounds(a))
        _wait("two rounds at A without C", lambda: sum(
            1 for r in done_rounds(a) if r["round"] > cut_at + 1 and ids["c"] not in r["contributors"]) >= 2,
            90, everyone)
        # Rounds without C can be quicker than A's ping-based detection of the dead link (three
        # unanswered pings) plus one dial timeout: keep the link down until A has tried C and failed.
        _wait("a failed dial to C in A's status", lambda: _link(bed, "a", a, "c")["dial_failures"] >= 1,
              60, everyone)
        during = done_rounds(a)
        bed.link_up("c")
        back_at = max(r["round"] for r in during)
        _wait("a round at A with C again", lambda: any(
            r["round"] > back_at and ids["c"] in r["contributors"] for r in done_rounds(a)), 120, everyone)
        report = _doctor(bed, "a", a)
    finally:
        _stop(everyone)
    without_c = [r["round"] for r in during if r["round"] > cut_at + 1 and ids["c"] not in r["contributors"]]
    assert len(without_c) >= 2 and all(ids["b"] in r["contributors"] for r in during if r["round"] in without_c)
    link = next(nb for nb in report["neighbours"] if nb["name"] == "c")
    assert link["connected"] and link["connection"] == "direct", link
    assert link["reconnects"] >= 1 and link["dial_failures"] >= 1, link  # in status: dials failed, then it came back


# On a saturated 1 Mbit/s link a ping waits behind the data queued on its connection for
# seconds: _IMPATIENT's 2-s pings closed live connections mid-transfer there. A 1 MiB write
# takes 8 s, so the stall timeout must be longer than that.
_SLOW_LINK = (
    "[network]\nhello_timeout_seconds = 10\nstall_timeout_seconds = 20\nreply_timeout_seconds = 30\n"
    "ping_interval_seconds = 10\n"
)


#: bytes each push must have carried before the cut: about six 64 KiB chunks, 3 s at 1 Mbit/s
#: of a 16 s transfer (at 200 KB a receiver was seen holding only one whole chunk: the rest sat
#: in socket buffers)
_CUT_AFTER = 400_000


def _cut_while_both_push(
    bed: NetBed, site: str, hospitals: list[Hospital], done_rounds: Callable[[Hospital], list[dict[str, Any]]]
) -> int:
    """Take ``site``'s link down while updates travel both ways on it, and return the last
    round every peer had finished (the cut hits the next one's pushes).

    A fixed pause after one side's round is not enough: the other side may finish that round
    seconds later (it received the update later, or trained slower), start its push after the
    cut, find the link down at once and go on without us. Only updates fill a 1 Mbit/s link
    (pings, hellos and acks are a few hundred bytes): at least 40 KB each way within one second
    means both pushes are under way. The cut waits until each way has carried
    :data:`_CUT_AFTER` bytes of them, so that each receiver holds whole chunks to keep (a cut
    in the first second of both pushes left one side with none in CI). A round whose pushes
    did not overlap is let pass."""
    def last_done(h: Hospital) -> int:
        return max((r["round"] for r in done_rounds(h)), default=-1)

    end = time.monotonic() + 180
    before = bed.traffic(site)
    carried = [0, 0]  # bytes each way since both pushes were seen under way
    while time.monotonic() < end:
        time.sleep(1.0)
        now = bed.traffic(site)
        moved = [n - b for n, b in zip(now, before, strict=True)]
        before = now
        finished = {last_done(h) for h in hospitals}
        if min(moved) >= 40_000 and len(finished) == 1:
            carried = [c + m for c, m in zip(carried, moved, strict=True)]
        else:
            carried = [0, 0]
        if min(carried) >= _CUT_AFTER:
            bed.link_down(site)
            return finished.pop()
        for h in hospitals:
            if h.proc is not None and h.proc.poll() is not None:
                raise AssertionError(f"{h.name} exited with {h.proc.returncode}: {_tail(h)}")
    raise AssertionError(f"no moment with updates travelling both ways on {site}'s link: "
                         + "; ".join(f"{h.name} {_rounds(h)[-4:]}" for h in hospitals))


#: bytes a push writes besides its envelope, per try: its hello and the prelude (a few hundred)
_HELLO_SLACK = 4096


def _sent_update_sizes(h: Hospital, round: int) -> list[int]:
    """Sizes of the updates ``h``'s audit log says it sent in ``round``."""
    with sqlite3.connect(f"file:{h.store}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute(
            "SELECT size FROM audit WHERE direction = 'sent' AND kind = 'update' AND round = ?", (round,)
        ).fetchall()
    return [int(r[0]) for r in rows]


@pytest.mark.slow
def test_link_down_mid_transfer_for_less_than_the_deadline_resumes_the_update(
    bed: NetBed, tmp_path: Path
) -> None:
    """Two hospitals exchange 1.9 MB updates over a 1 Mbit/s link (about 16 s each way). B's
    link goes down for 25 s in the middle of a round's transfers (deadline 120 s): each side keeps what it
    received, the sender dials again with backoff, offers the same envelope, and only the
    rest travels. The round completes with both contributions, the resumed bytes are in
    both peers' status, and the round's bytes_sent is at most one update per try."""
    sites = {"a": bed.add_public("a"), "b": bed.add_public("b")}
    hs = _hospitals(tmp_path, list(sites))
    ids = {n: h.peer_id for n, h in hs.items()}
    for i, (n, h) in enumerate(hs.items()):
        trusted = {m: (ids[m], f"/ip4/{sites[m].address}/tcp/{PORT}") for m in hs if m != n}
        _write_config(h, i, 2, trusted, deadline=120, rounds=0, network=_SLOW_LINK, size="small")
    everyone = list(hs.values())
    a, b = hs["a"], hs["b"]
    bed.rate_limit("b", 1)

    def done_rounds(h: Hospital) -> list[dict[str, Any]]:
        return [r for r in _rounds(h) if r["status"] == "done"]

    try:
        for n, h in hs.items():
            _start(bed, n, h)
        _wait("a first round with both", lambda: any(ids["b"] in r["contributors"] for r in done_rounds(a)),
              120, everyone)
        first = _cut_while_both_push(bed, "b", everyone, done_rounds)
        time.sleep(25)  # past the stall timeout, so that both ends give the broken streams up
        bed.link_up("b")
        _wait("a round at A with B after the outage", lambda: any(
            r["round"] > first and ids["b"] in r["contributors"] for r in done_rounds(a)), 150, everyone)
        reports = {n: _doctor(bed, n, h) for n, h in hs.items()}
        rounds_a = done_rounds(a)
    finally:
        _stop(everyone)
    transfers = {n: r["transfers"] for n, r in reports.items()}
    kept = sum(t["partials_kept"] for t in transfers.values())
    resumed = sum(t["resumed_receives"] for t in transfers.values())
    assert kept >= 1 and resumed >= 1, (transfers, _tail(a), _tail(b))
    saved = sum(t["bytes_resumed"] for t in transfers.values())
    assert saved == sum(t["bytes_not_resent"] for t in transfers.values()) > 0, transfers
    # the round the outage hit includes B at A; a resuming sender's round counts every try's
    # bytes: at least the update, and at most the update per try (a link that just came back
    # can break a resumed try again: three unanswered pings close a connection whose pings wait
    # behind a saturated 1 Mbit/s queue). What resuming saved is the status counters' (above):
    # they add up over the peer's life, so a resume in a later round cannot be taken off this one
    after = [r for r in rounds_a if r["round"] > first]
    assert after and ids["b"] in after[0]["contributors"], rounds_a
    for n, h in hs.items():
        if transfers[n]["resumed_sends"]:
            r = next(r for r in _rounds(h) if r["round"] == first + 1)
            size = max(_sent_update_sizes(h, first + 1))
            other = next(m for m in hs if m != n)
            tries = 1 + (h.dir / "peer.log").read_text(errors="replace").count(
                f"push to {ids[other][-8:]} in round {first + 1} failed")
            bound = tries * (size + _HELLO_SLACK)
            assert size <= r["bytes_sent"] <= bound, (r, size, tries, transfers[n])
            print(f"{n}: update {size} B, {tries} tries, round bytes_sent {r['bytes_sent']}, transfers {transfers[n]}")


@pytest.mark.slow
def test_a_cyclic_ring_goes_round_a_dead_link_and_closes_again(bed: NetBed, tmp_path: Path) -> None:
    """Three hospitals pass one model round a ring a -> b -> c -> a (``cyclic``, committing the
    lap mean). C's link goes down for longer than the deadline: A, waiting for C's model,
    skips it at the deadline and goes on from its own; once the link is back, A takes C's
    model again. No update (model or lap mean) is refused on the way."""
    sites = {"a": bed.add_public("a"), "b": bed.add_public("b"), "c": bed.add_public("c")}
    hs = _hospitals(tmp_path, list(sites))
    ids = {n: h.peer_id for n, h in hs.items()}
    order = ", ".join(f'"{ids[n]}"' for n in ("a", "b", "c"))
    ring = f'\n[strategy]\nname = "cyclic"\nparams = {{ order = [{order}], commit = "lap_mean" }}\n'
    for i, (n, h) in enumerate(hs.items()):
        trusted = {m: (ids[m], f"/ip4/{sites[m].address}/tcp/{PORT}") for m in hs if m != n}
        # a lap (three turns of 2 steps) fits well inside the deadline; a silent neighbour is
        # dropped and redialled after a few seconds
        _write_config(h, i, 3, trusted, deadline=15, rounds=0, network=_IMPATIENT + ring)
    everyone = list(hs.values())
    a = hs["a"]

    def done_rounds(h: Hospital) -> list[dict[str, Any]]:
        return [r for r in _rounds(h) if r["status"] == "done"]

    def from_c(r: dict[str, Any]) -> bool:
        return ids["c"] in r["contributors"]

    try:
        for n, h in hs.items():
            _start(bed, n, h)
        _wait("a round at A that took C's model", lambda: any(from_c(r) for r in done_rounds(a)), 120, everyone)
        bed.link_down("c")
        cut_at = max(r["round"] for r in done_rounds(a))
        _wait("two rounds at A without C's model", lambda: sum(
            1 for r in done_rounds(a) if r["round"] > cut_at + 1 and not from_c(r)) >= 2, 120, everyone)
        during = done_rounds(a)
        bed.link_up("c")
        back_at = max(r["round"] for r in during)
        _wait("a round at A with C's model again", lambda: any(
            r["round"] > back_at and from_c(r) for r in done_rounds(a)), 180, everyone)
        after = {n: done_rounds(h) for n, h in hs.items()}
    finally:
        _stop(everyone)
    assert all(r["contributors"] in ([], [ids["c"]]) for r in after["a"])  # only ever its predecessor
    assert any(r["contributors"] == [ids["a"]] for r in after["b"])
    with_c = [r["round"] for r in after["a"] if from_c(r)]
    assert min(with_c) <= cut_at < max(with_c)
    for h in everyone:
        with sqlite3.connect(f"file:{h.store}?mode=ro", uri=True, timeout=5) as conn:
            refused = conn.execute("SELECT peer, kind, reason FROM audit WHERE direction = 'refused' "
                                   "AND peer IN (?, ?, ?)", tuple(ids.values())).fetchall()
            laps = dict(conn.execute("SELECT round, value FROM metrics WHERE name = 'lap_count'").fetchall())
        assert [r for r in refused if "lap" in r[2] or "update bound" in r[2]] == [], (h.name, refused)
        if h is a:  # a round without C's model starts a new lap: its mean holds A's model alone
            assert all(laps[r["round"]] == 1 for r in after["a"] if not from_c(r)), laps
            assert all(1 <= v <= 3 for v in laps.values()), laps
