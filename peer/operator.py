"""What the operator may ask of a running peer: the interface behind the control API.

The daemon implements :class:`Operator`; the HTTP control API (``control.py``) and the
CLI commands that talk to it depend only on this interface, so they can be tested
against a small fake and the daemon can change underneath.

Every method raises :class:`OperatorError` for a request that cannot be honoured
(unknown model, bad name, dataset folder that does not validate...) with a message fit
to show the operator as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class OperatorError(Exception):
    """A request the peer refuses; the message is shown to the operator as is.

    ``status`` is the HTTP status the control API answers with (400 bad request,
    404 unknown object, 409 conflict).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Operator(Protocol):
    """Operations of a running peer. Methods are async: they run on the daemon's trio loop."""

    async def status(self) -> dict[str, Any]:
        """PeerID, federation, task, strategy, participation policy, current round and phase,
        listen addresses, uptime, health, privacy budget, the study and its approval."""

    async def neighbours(self) -> list[dict[str, Any]]:
        """Each trusted peer: peer_id, name, address, connected, last_seen, samples announced,
        data_announced_at, refused (count), selected (takes part in the next round)."""

    async def select_neighbours(self, peer_ids: list[str]) -> list[dict[str, Any]]:
        """Choose which trusted peers take part in the next round; returns neighbours()."""

    async def rounds(self) -> list[dict[str, Any]]:
        """Per round: round, status, started_at, finished_at, metric values, contributors,
        skipped and undelivered (with reasons), bytes_sent, bytes_received."""

    async def models(self) -> list[dict[str, Any]]:
        """Model versions: digest, round, name, parent, created_at, origin."""

    async def rename_model(self, ref: str, name: str) -> dict[str, Any]:
        """Name a model version (ref = digest, unique digest prefix or current name)."""

    async def delete_model(self, ref: str) -> dict[str, Any]:
        """Delete a model version's weights; the record stays in the history."""

    async def export_model(self, ref: str, fmt: str) -> Path:
        """Write the model as ``fmt`` (``"pt"`` plain state dict or ``"safetensors"``) to a
        file and return its path."""

    async def import_model(self, data: bytes, filename: str) -> dict[str, Any]:
        """Import an initial model from a safetensors file's bytes; validated like received
        weights (names and shapes of this task's model, dtypes, finite values)."""

    async def datasets(self) -> list[dict[str, Any]]:
        """Registered datasets with their manifests (count, shapes, label kind, digest)."""

    async def register_dataset(self, path: str) -> dict[str, Any]:
        """Validate a dataset folder and register it; its sample count is announced."""

    async def approvals(self) -> list[dict[str, Any]]:
        """Pending and decided approval requests (participation policy ``manual``)."""

    async def decide(self, approval_id: int, approve: bool) -> dict[str, Any]:
        """Approve or decline one pending request."""

    async def approve_study(self, digest: str) -> dict[str, Any]:
        """Approve the study manifest with this digest (hex): the peer's own, named in ``[study]``.

        Recorded as a signed ``local`` audit entry ``study-approved``; the peer trains and
        talks to neighbours only once it is. Returns the study as ``status()["study"]``.
        """

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recent audit-log entries, newest first."""

    async def verify_audit(self) -> dict[str, Any]:
        """Verify this peer's whole audit log (chain, signatures, checkpoints); the report
        as JSON with ``ok``, ``summary`` and ``findings``."""
