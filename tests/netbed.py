"""A test bed of Linux network namespaces: hospitals as separate hosts, NAT routers, a WAN.

Not a test module. Tests build a :class:`NetBed` with the :func:`open_netbed` context
manager, which removes everything it made even when the test fails, and removes the
leftovers of earlier runs that died (namespaces named with :data:`PREFIX` whose creating
process is gone) when it starts.

Layout (every address is inside namespaces the bed made; 198.18.0.0/15 is reserved for
network tests by RFC 2544)::

    [wan]  bridge "wan" 198.18.0.1/24 ---- veth ---- [hospital A] 198.18.0.10  (public)
                                     \\--- veth ---- [router B] 198.18.0.20 | 10.2.0.1 ---- [hospital B] 10.2.0.2
                                      \\-- ...

* a public host has one address on the WAN and no firewall;
* a NATed host sits behind its own router namespace: nftables masquerades its traffic to
  the router's WAN address and drops every new connection from the WAN side (no inbound
  port, no port forward), as a hospital firewall does;
* every site's WAN link can be rate-limited (``tc tbf`` on both directions), made lossy
  (an nftables ``numgen random`` drop rule in the WAN namespace) and taken down
  (``ip link set down`` on the WAN side of its veth).

Needs root, ``ip`` (iproute2), ``tc`` and ``nft`` (Debian's ``nftables``, installed by
``make net-deps``); :func:`missing_requirements` says which is missing so tests can skip
with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

#: every namespace this bed makes is called PREFIX<creator pid>-<name>
PREFIX = "smnb"
WAN_NET = "198.18.0"


class NetBedError(RuntimeError):
    """A command that builds or changes the bed failed; the message has its stderr."""


def missing_requirements() -> str | None:
    """Why the bed cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"'{tool}' is missing (install Debian's {package}: make net-deps)"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "exec", probe, "nft", "add", "table", "ip", "probe"])
    except NetBedError as exc:
        return f"network namespaces or nftables do not work here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise NetBedError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_inside(ns: str) -> None:
    """SIGKILL every process still running in ``ns`` (a Ray node leaves workers behind)."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
    for pid in out.split():
        if pid.isdigit() and int(pid) != os.getpid():
            with suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), 9)


def stop_processes(procs: Iterable[subprocess.Popen[bytes] | None], wait: float) -> None:
    """SIGTERM every process still running (peers stop cleanly on it), then wait up to
    ``wait`` s for each; one that does not exit by then is killed."""
    procs = [p for p in procs if p is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def clean_leftovers() -> list[str]:
    """Remove namespaces of earlier beds whose creating process is gone; their names."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        digits = name[len(PREFIX) :].split("-", 1)[0]
        pid = int(digits) if digits.isdigit() else None
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue  # another live test run's bed
        kill_inside(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        removed.append(name)
    return removed


@dataclass
class Site:
    """One hospital's host (and its router, when it is behind NAT)."""

    name: str
    ns: str
    address: str  # the host's own address
    public_address: str  # where the WAN sees it (the router's address when NATed)
    router_ns: str | None = None
    wan_port: str = ""  # the veth end in the WAN namespace


@dataclass
class NetBed:
    """Namespaces, links and rules of one test (see the module docstring)."""

    tag: str
    sites: dict[str, Site] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    _next: int = 0

    @property
    def wan_ns(self) -> str:
        return f"{PREFIX}{self.tag}-wan"

    def _ns(self, name: str) -> str:
        ns = f"{PREFIX}{self.tag}-{name}"
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self.exec_quiet(ns, ["ip", "link", "set", "lo", "up"])
        return ns

    def exec_quiet(self, ns: str, argv: Sequence[str], *, stdin: str | None = None) -> str:
        return _run(["ip", "netns", "exec", ns, *argv], stdin=stdin)

    def command(self, site: str, argv: Sequence[str]) -> list[str]:
        """``argv`` to run as a process inside ``site``'s host namespace."""
        return ["ip", "netns", "exec", self.sites[site].ns, *argv]

    def start(self) -> None:
        ns = self._ns("wan")
        self.exec_quiet(ns, ["ip", "link", "add", "wan", "type", "bridge"])
        self.exec_quiet(ns, ["ip", "addr", "add", f"{WAN_NET}.1/24", "dev", "wan"])
        self.exec_quiet(ns, ["ip", "link", "set", "wan", "up"])
        # the loss rules live in one table of the WAN namespace, one rule per lossy port
        self.exec_quiet(
            ns,
            ["nft", "-f", "-"],
            stdin="table bridge loss {\n chain forward { type filter hook forward priority 0; policy accept; }\n}\n",
        )

    def _wan_link(self, name: str, inner_ns: str) -> tuple[str, str]:
        """A veth from ``inner_ns`` (device ``wan0``) into the WAN bridge; (address, port)."""
        self._next += 1
        port = f"p{self._next}-{name}"[:15]
        address = f"{WAN_NET}.{10 * self._next}"
        _run(["ip", "link", "add", "wan0", "netns", inner_ns, "type", "veth",
              "peer", "name", port, "netns", self.wan_ns])
        self.exec_quiet(self.wan_ns, ["ip", "link", "set", port, "master", "wan", "up"])
        self.exec_quiet(inner_ns, ["ip", "addr", "add", f"{address}/24", "dev", "wan0"])
        self.exec_quiet(inner_ns, ["ip", "link", "set", "wan0", "up"])
        return address, port

    def add_public(self, name: str) -> Site:
        """A host with its own address on the WAN, reachable by everyone."""
        ns = self._ns(name)
        address, port = self._wan_link(name, ns)
        site = Site(name, ns, address, address, wan_port=port)
        self.sites[name] = site
        return site

    def add_natted(self, name: str) -> Site:
        """A host behind its own NAT router: it can dial out; nothing can dial in."""
        router = self._ns(f"{name}-r")
        host = self._ns(name)
        public, port = self._wan_link(name, router)
        lan = f"10.{self._next}.0"
        _run(["ip", "link", "add", "lan0", "netns", router, "type", "veth", "peer", "name", "eth0", "netns", host])
        self.exec_quiet(router, ["ip", "addr", "add", f"{lan}.1/24", "dev", "lan0"])
        self.exec_quiet(router, ["ip", "link", "set", "lan0", "up"])
        self.exec_quiet(host, ["ip", "addr", "add", f"{lan}.2/24", "dev", "eth0"])
        self.exec_quiet(host, ["ip", "link", "set", "eth0", "up"])
        self.exec_quiet(host, ["ip", "route", "add", "default", "via", f"{lan}.1"])
        self.exec_quiet(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.exec_quiet(
            router,
            ["nft", "-f", "-"],
            stdin=(
                "table ip nat {\n"
                " chain postrouting { type nat hook postrouting priority 100; policy accept;\n"
                '  oifname "wan0" masquerade\n }\n}\n'
                "table ip firewall {\n"
                " chain forward { type filter hook forward priority 0; policy drop;\n"
                '  iifname "lan0" accept\n'
                "  ct state established,related accept\n }\n"
                " chain input { type filter hook input priority 0; policy drop;\n"
                '  iifname "lo" accept\n  iifname "lan0" accept\n  ct state established,related accept\n }\n}\n'
            ),
        )
        site = Site(name, host, f"{lan}.2", public, router_ns=router, wan_port=port)
        self.sites[name] = site
        return site

    def rate_limit(self, name: str, mbit: float) -> None:
        """Limit ``name``'s WAN link to ``mbit`` Mbit/s each way (tc tbf on both veth ends)."""
        site = self.sites[name]
        rate = f"{mbit}mbit"
        for ns, dev in ((site.router_ns or site.ns, "wan0"), (self.wan_ns, site.wan_port)):
            tbf = ["tbf", "rate", rate, "burst", "64kb", "latency", "200ms"]
            self.exec_quiet(ns, ["tc", "qdisc", "replace", "dev", dev, "root", *tbf])

    def set_loss(self, name: str, percent: float) -> None:
        """Drop ``percent`` % of the frames leaving and entering ``name``'s WAN port (0: none)."""
        self.losses[self.sites[name].wan_port] = percent
        rules = []
        for port, loss in self.losses.items():
            if loss > 0:
                per_mille = round(loss * 10)
                rules += [f'  {d} "{port}" numgen random mod 1000 < {per_mille} drop\n' for d in ("iifname", "oifname")]
        self.exec_quiet(
            self.wan_ns,
            ["nft", "-f", "-"],
            stdin="flush chain bridge loss forward\ntable bridge loss {\n chain forward {\n"
            + "".join(rules)
            + " }\n}\n",
        )

    def link_down(self, name: str) -> None:
        """Cut ``name`` off the WAN (its veth's WAN end goes down): an outage."""
        self.exec_quiet(self.wan_ns, ["ip", "link", "set", self.sites[name].wan_port, "down"])

    def link_up(self, name: str) -> None:
        self.exec_quiet(self.wan_ns, ["ip", "link", "set", self.sites[name].wan_port, "up"])

    def traffic(self, name: str) -> tuple[int, int]:
        """Bytes (from ``name``, to ``name``) through its WAN port so far, headers included."""
        out = self.exec_quiet(self.wan_ns, ["ip", "-j", "-s", "link", "show", "dev", self.sites[name].wan_port])
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])  # the WAN end receives what it sends

    def can_connect(self, src: str, dst_ip: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from ``src``'s host to ``dst_ip:port`` gets through."""
        code = (
            "import socket,sys\n"
            f"s=socket.socket(); s.settimeout({timeout})\n"
            f"sys.exit(0 if s.connect_ex(('{dst_ip}', {port})) == 0 else 1)\n"
        )
        proc = subprocess.run(
            self.command(src, ["python3", "-c", code]), capture_output=True, check=False, timeout=timeout + 10
        )
        return proc.returncode == 0

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            kill_inside(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.namespaces.clear()


@dataclass
class Hospital:
    """One hospital's peer in the bed: its folder (key, ``peer.toml``, store) and process."""

    name: str
    dir: Path
    peer_id: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.dir / "peer.toml"

    @property
    def store(self) -> Path:
        return self.dir / "state" / "store.sqlite"


@contextmanager
def open_netbed() -> Iterator[NetBed]:
    """A fresh bed, removed on exit whatever happened; earlier runs' leftovers go first."""
    clean_leftovers()
    bed = NetBed(tag=str(os.getpid()))
    try:
        bed.start()
        yield bed
    finally:
        bed.close()
