"""Operator consent for policy ``manual``: requests persisted in the store, waited for on the loop.

A round (or a neighbour's train-request) that needs the operator's approval adds a
pending request to the store and waits; the operator decides through the control API
(:meth:`Consent.decide`). A request nobody waits for any more (its deadline passed, the
peer stopped or was killed) is marked ``expired`` and can no longer be approved.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from silomesh.peer.operator import OperatorError
from silomesh.peer.store import Store

log = logging.getLogger(__name__)


class Consent:
    """Operator decisions for policy ``manual``, persisted in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._events: dict[int, trio.Event] = {}
        # a previous run's pending requests can no longer be answered: nobody waits for them
        store.expire_pending_approvals()

    async def wait(self, kind: str, round: int, peer: str = "", detail: str = "") -> bool:
        """Ask the operator; True once approved, False once declined.

        Cancelling the wait (a deadline, shutdown) expires the request.
        """
        approval_id = self.store.add_approval(kind, round, peer, detail)
        event = self._events.setdefault(approval_id, trio.Event())
        log.info("waiting for operator approval #%d: %s round %d %s", approval_id, kind, round, peer)
        try:
            await event.wait()
        finally:  # cancelled (deadline, shutdown): the request can no longer be approved
            self._events.pop(approval_id, None)
            row = self.store.approval(approval_id)
            if row is not None and row["status"] == "pending":
                self.store.decide_approval(approval_id, "expired")
        row = self.store.approval(approval_id)
        return row is not None and row["status"] == "approved"

    def decide(self, approval_id: int, approve: bool) -> dict[str, Any]:
        """Approve or decline a pending request.

        Raises:
            OperatorError: 404 for an unknown request, 409 for one already decided or expired.
        """
        row = self.store.approval(approval_id)
        if row is None:
            raise OperatorError(f"no approval #{approval_id}", 404)
        if row["status"] != "pending":
            raise OperatorError(f"approval #{approval_id} was already {row['status']}", 409)
        self.store.decide_approval(approval_id, "approved" if approve else "declined")
        event = self._events.pop(approval_id, None)
        if event is not None:
            event.set()
        return dict(self.store.approval(approval_id) or {})

    def list(self) -> list[dict[str, Any]]:
        return self.store.approvals()
