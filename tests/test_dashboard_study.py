"""The dashboard's approvals page shows the study for review and approves it by its digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from test_control import BASE, TOKEN, FakeOperator
from test_dashboard_routes import _login

from silomesh.peer.control import make_app
from silomesh.peer.operator import OperatorError

DIGEST = "5e" * 32
MEMBER = "12D3KooWMember"
STUDY = {"format": "silomesh-study/1", "name": "cardio-2026", "version": 3, "federation": "fed",
         "task": {"name": "catheter", "model": "catheter/tiny"},
         "strategy": {"name": "fedavg", "params": {"weighting": "samples"}},
         "rounds": {"count": 10, "local_steps": 50, "batch_size": 8, "lr": 0.001}, "privacy": None,
         "members": [MEMBER, "12D3KooWSelf"], "digest": DIGEST, "proposer": MEMBER}


class StudyOperator(FakeOperator):
    approved = False

    async def status(self) -> dict[str, Any]:
        return {**await super().status(), "study": {**STUDY, "approved": self.approved}}

    async def approve_study(self, digest: str) -> dict[str, Any]:
        self._call("approve_study", digest)
        if digest != DIGEST:
            raise OperatorError("not this peer's study", 409)
        self.approved = True
        return {**STUDY, "approved": True}


def _client(operator: FakeOperator) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(make_app(operator, TOKEN)), base_url=BASE)


async def test_approvals_page_shows_an_unapproved_study_with_every_field_and_an_approve_button(tmp_path: Path) -> None:
    async with _client(StudyOperator(tmp_path)) as client:
        await _login(client)
        page = (await client.get("/dashboard/approvals")).text
    assert "Not approved" in page and "cardio-2026 version 3" in page
    assert f'id="approve-study" data-digest="{DIGEST}"' in page
    assert MEMBER in page and "catheter/tiny" in page and "none (no DP-SGD)" in page


async def test_approving_the_study_from_the_dashboard_needs_the_csrf_token_and_the_digest(tmp_path: Path) -> None:
    operator = StudyOperator(tmp_path)
    async with _client(operator) as client:
        csrf = await _login(client)
        no_csrf = await client.post("/api/study/approve", json={"digest": DIGEST})
        wrong = await client.post("/api/study/approve", json={"digest": "00" * 32}, headers={"X-CSRF-Token": csrf})
        bad = await client.post("/api/study/approve", json={"digest": "zz"}, headers={"X-CSRF-Token": csrf})
        ok = await client.post("/api/study/approve", json={"digest": DIGEST}, headers={"X-CSRF-Token": csrf})
        page = (await client.get("/dashboard/approvals")).text
    assert no_csrf.status_code == 403
    assert wrong.status_code == 409 and bad.status_code == 400
    assert ok.status_code == 200 and ok.json()["approved"] is True
    assert [c for c in operator.calls if c[0] == "approve_study"] == [("approve_study", ("00" * 32,)),
                                                                      ("approve_study", (DIGEST,))]
    assert "Approved: this peer trains" in page and 'id="approve-study"' not in page


async def test_approvals_page_without_a_study_shows_no_study_section(tmp_path: Path) -> None:
    async with _client(FakeOperator(tmp_path)) as client:
        await _login(client)
        page = (await client.get("/dashboard/approvals")).text
    assert 'id="study"' not in page and "approve-study" not in page
