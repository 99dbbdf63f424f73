"""The peer's side of a study manifest: match it to peer.toml, wait for the operator, gate hellos.

A peer whose peer.toml has ``[study] manifest = FILE`` reads and verifies the signed
manifest at start (:func:`load_study`) and refuses to start when its own configuration
differs from it, naming each field. It then trains nothing until its operator approved
that digest (:class:`StudyGate`; the approval is a signed ``local`` audit entry of kind
:data:`STUDY_APPROVED_KIND`, so a restart finds it again) and refuses the hello of any
neighbour that runs another study, none, or is not a member (:func:`study_refusal`). A
peer without ``[study]`` works as before. docs/PRIVACY.md, "The study manifest".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from silomesh.peer.audit import AuditLog
from silomesh.peer.config import PeerConfig
from silomesh.peer.operator import OperatorError
from silomesh.protocol.study import (
    SignedStudy,
    StudyError,
    StudyManifest,
    manifest_differences,
    read_study,
    split_hello_model,
)

log = logging.getLogger(__name__)

#: the audit entry (direction ``local``) recording the operator's approval of a study digest
STUDY_APPROVED_KIND = "study-approved"


def manifest_for(config: PeerConfig, *, name: str, version: int, members: Iterable[str]) -> StudyManifest:
    """The manifest ``config`` describes (what ``silomesh study create`` signs, and what a peer checks).

    Raises:
        StudyError: naming a field a manifest cannot hold (a TOML date in the strategy's params...).
    """
    privacy = config.privacy
    return StudyManifest(
        name=name,
        version=version,
        federation=config.federation,
        task=config.task.name,
        model=config.task.model_id,
        strategy=config.strategy.name,
        strategy_params=config.strategy.params,
        rounds={
            "count": config.rounds.count,
            "local_steps": config.rounds.local_steps,
            "batch_size": config.rounds.batch_size,
            "lr": config.rounds.lr,
        },
        privacy=None if not privacy.enabled else {
            "target_epsilon": privacy.target_epsilon,
            "delta": privacy.delta,
            "max_grad_norm": privacy.max_grad_norm,
            "noise_multiplier": privacy.noise_multiplier,
            "planned_steps": privacy.planned_steps,
        },
        members=tuple(sorted(set(members))),
    )


def config_differences(config: PeerConfig, study: SignedStudy, peer_id: str) -> list[str]:
    """Every way ``config`` (run by ``peer_id``) departs from ``study``, one line per field; [] if none."""
    out: list[str] = []
    members = set(study.manifest.members)
    if peer_id not in members:
        out.append(f"members: this peer ({peer_id}) is not a member of the study")
    for i, t in enumerate(config.trusted):
        if t.peer_id not in members:
            out.append(f"trusted[{i}].peer_id: {t.peer_id} ({t.name}) is not a member of the study")
    m = study.manifest
    try:
        ours = manifest_for(config, name=m.name, version=m.version, members=m.members)
    except StudyError as exc:
        return [*out, str(exc)]
    return [*out, *manifest_differences(m, ours)]


def load_study(config: PeerConfig, peer_id: str) -> SignedStudy | None:
    """The verified study of ``[study]`` (None without one), checked against ``config``.

    Raises:
        OperatorError: the file is unreadable, malformed, not signed by a member, or
            differs from ``config`` (every differing field named).
    """
    path = config.study.manifest
    if path is None:
        return None
    try:
        study = read_study(path.read_bytes())
    except OSError as exc:
        raise OperatorError(f"study.manifest: cannot read {path}: {exc.strerror}") from None
    except StudyError as exc:
        raise OperatorError(f"study.manifest: {path}: {exc}") from None
    differs = config_differences(config, study, peer_id)
    if differs:
        raise OperatorError(
            f"study.manifest: {path} ({study.label}) does not match this peer's configuration: " + "; ".join(differs)
        )
    return study


def approved_digests(entries: Iterable[Mapping[str, Any]]) -> set[str]:
    """The study digests (hex) this peer's operator approved, from its audit entries."""
    return {
        str(e.get("payload_digest"))
        for e in entries
        if e.get("direction") == "local" and e.get("kind") == STUDY_APPROVED_KIND
    }


class StudyGate:
    """A peer's study and whether its operator approved it: training and hellos wait on it."""

    def __init__(self, study: SignedStudy, audit_log: AuditLog) -> None:
        self.study = study
        self.members = frozenset(study.manifest.members)
        self._audit_log = audit_log
        self._approved = trio.Event()
        if study.digest_hex in approved_digests(audit_log.entries()):
            self._approved.set()

    @property
    def approved(self) -> bool:
        return self._approved.is_set()

    async def wait_approved(self) -> None:
        """Return once the operator approved this study (at once if it already had)."""
        if not self.approved:
            log.warning("study %s waits for the operator's approval: silomesh study approve FILE", self.study.label)
        await self._approved.wait()

    def approve(self, digest: str) -> dict[str, Any]:
        """Record the operator's approval of ``digest`` (hex) in the audit log; idempotent.

        Raises:
            OperatorError: 409 if ``digest`` is not this peer's study (the file changed since).
        """
        if digest != self.study.digest_hex:
            raise OperatorError(
                f"study {digest[:12]} is not this peer's study {self.study.label}: its peer.toml names "
                f"another manifest, or the file changed (a changed study needs the peer restarted with it)",
                409,
            )
        if not self.approved:
            self._audit_log.append(
                "local", self.study.proposer, STUDY_APPROVED_KIND, payload_digest=digest,
                reason=f"{self.study.label} proposed by {self.study.proposer}",
            )
            self._approved.set()
            log.info("the operator approved study %s", self.study.label)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """The study as the operator reviews it (status, dashboard)."""
        m = self.study.manifest
        return {**m.to_json(), "digest": self.study.digest_hex, "proposer": self.study.proposer,
                "approved": self.approved}


def study_refusal(gate: StudyGate | None, remote: str, hello_model: str) -> str | None:
    """Why a neighbour's hello is refused for the study, or None.

    Refused: a hello naming another study (or one, when we have none, or none when we
    have one), a sender who is not a member, and any hello before our operator approved.
    """
    _, theirs = split_hello_model(hello_model)
    if gate is None:
        return None if not theirs else f"study differs: we take part in no study; the neighbour runs {theirs[:12]}"
    label = gate.study.label
    if theirs != gate.study.digest_hex:
        named = f"the neighbour's is {theirs[:12]}" if theirs else "the neighbour names no study"
        return f"study differs: ours is {label}, {named}"
    if remote not in gate.members:
        return f"{remote} is not a member of study {label}"
    if not gate.approved:
        return f"study {label} is not approved by this hospital's operator yet"
    return None
