"""The dashboard's overview shows the peer's privacy budget, and why it stopped when spent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from test_control import BASE, TOKEN, FakeOperator
from test_dashboard_routes import _login

from silomesh.peer.control import make_app

BUDGET = {"exhausted": True, "reason": "privacy budget spent: eps 2.950 of 3; another round would pass the target",
          "epsilon_spent": 2.95, "epsilon_target": 3.0, "epsilon_remaining": 0.05, "delta": 1e-5,
          "noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.125, "steps": 120}


class PrivateOperator(FakeOperator):
    async def status(self) -> dict[str, Any]:
        return {**await super().status(), "phase": "budget-exhausted", "privacy": BUDGET}


async def test_overview_shows_the_budget_spent_left_and_why_the_peer_stopped(tmp_path: Path) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(make_app(PrivateOperator(tmp_path), TOKEN)),
                                 base_url=BASE) as client:
        await _login(client)
        page = (await client.get("/dashboard/")).text
    assert "Privacy budget" in page
    assert "2.950 of 3.0" in page and "0.050" in page
    assert "another round would pass the target" in page


async def test_overview_without_privacy_shows_no_budget(tmp_path: Path) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(make_app(FakeOperator(tmp_path), TOKEN)),
                                 base_url=BASE) as client:
        await _login(client)
        page = (await client.get("/dashboard/")).text
    assert "Privacy budget" not in page
