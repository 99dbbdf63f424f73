"""Helpers for tests that start real peers on 127.0.0.1 (not a test module)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import numpy as np

from silomesh.peer.config import PeerConfig, parse_config
from silomesh.peer.identity import PeerIdentity

TINY_CATHETER = {"image_size": 32, "n_train": 16, "n_test": 8, "n_test_source": 8}


def identity(name: str) -> PeerIdentity:
    return PeerIdentity.from_seed(hashlib.sha256(f"silomesh-test-{name}".encode()).digest())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ring(n: int) -> list[list[int]]:
    if n == 2:
        return [[1], [0]]
    return [sorted({(i - 1) % n, (i + 1) % n}) for i in range(n)]


def configs(
    root: Path,
    n: int,
    *,
    strategy: str = "fedavg",
    rounds: int = 2,
    deadline: float = 30.0,
    neighbours: list[list[int]] | None = None,
    participation: str = "auto",
    local_steps: int = 3,
    extra: dict[str, Any] | None = None,
) -> tuple[list[PeerIdentity], list[PeerConfig]]:
    """Identities and configs of ``n`` peers on a ring (or the given graph)."""
    ids = [identity(f"p{i}") for i in range(n)]
    ports = [free_port() for _ in range(n)]
    graph = neighbours or ring(n)
    out = []
    for i in range(n):
        raw: dict[str, Any] = {
            "federation": "test-fed",
            "key_file": "peer.key",
            "listen": f"/ip4/127.0.0.1/tcp/{ports[i]}",
            "data_dir": str(root / f"p{i}"),
            "participation": participation,
            "task": {
                "name": "catheter",
                "size": "tiny",
                "options": {"silos": n, "silo": i, "seed": 0, **TINY_CATHETER},
            },
            "strategy": {"name": strategy},
            "rounds": {"count": rounds, "deadline_seconds": deadline, "local_steps": local_steps, "batch_size": 8},
            "control": {"port": 0},
            "trusted": [
                {"peer_id": ids[j].peer_id_text, "address": f"/ip4/127.0.0.1/tcp/{ports[j]}", "name": f"p{j}"}
                for j in graph[i]
            ],
        }
        raw.update(extra or {})
        out.append(parse_config(raw, root))
    return ids, out


def write_png_folder(root: Path, n: int, size: int) -> Path:
    """``root/images/NAME.png`` + ``root/masks/NAME.png`` (classes 0..2), as data_io expects."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(rng.integers(0, 3, (size, size), dtype=np.uint8)).save(root / "masks" / f"s{i}.png")
    return root
