"""The study manifest: one signed document naming what a federation trains, and who.

A study fixes the task and model (the hello's model id, whose last part is the digest of
the network's arguments), the strategy and its parameters, the rounds, the DP-SGD
settings and the member PeerIDs. Its canonical form is JSON with sorted keys, no
whitespace, ASCII only (``\\uXXXX`` escapes) and no NaN or infinity; the study is named by
``BLAKE2b-256(DIGEST_DOMAIN || canonical JSON)``. A member proposes it by signing
``SIGNING_DOMAIN || digest`` with its Ed25519 key; each hospital approves the digest on
its own (the peer records the approval in its signed audit log). Changing any field
gives another digest, so it needs a new approval everywhere.

A study file is a JSON object ``{"manifest": {...}, "proposer": PeerID, "signature":
hex}``. Reading it never executes anything: it is parsed as JSON, every key and type is
checked, and the digest is recomputed from the canonical form, never taken from the file.

A peer under a study sends ``MODEL_ID@<64 hex digits of the study digest>`` as its hello's
``model`` (PROTOCOL.md section 9), so neighbours find a different or missing study before
any weights travel. docs/PRIVACY.md describes the operator's side.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .identity import Identity, verify_signature
from .peerid import PeerIdError, peer_id_from_public_key, public_key_from_peer_id

__all__ = [
    "DIGEST_DOMAIN",
    "SIGNING_DOMAIN",
    "STUDY_FORMAT",
    "SignedStudy",
    "StudyError",
    "StudyManifest",
    "canonical_json",
    "hello_model",
    "manifest_differences",
    "read_study",
    "split_hello_model",
]

STUDY_FORMAT = "silomesh-study/1"
DIGEST_DOMAIN = b"silomesh/study/v1\x00"
SIGNING_DOMAIN = b"silomesh/study-signature/v1\x00"
#: a study file larger than this is refused unread
MAX_STUDY_BYTES = 1 << 20
#: most member PeerIDs one study may list
MAX_MEMBERS = 1024
#: the hello's ``model`` field limit (PROTOCOL.md section 5)
MAX_HELLO_MODEL_BYTES = 128
#: separates the model id from the study digest in a hello's ``model``
STUDY_SEPARATOR = "@"
PRIVACY_KEYS = ("target_epsilon", "delta", "max_grad_norm", "noise_multiplier", "planned_steps")
ROUND_KEYS = ("count", "local_steps", "batch_size", "lr")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


class StudyError(ValueError):
    """A study file or manifest is malformed, tampered with or signed by a non-member; the message says which field."""


def canonical_json(value: object) -> bytes:
    """The canonical JSON bytes of ``value`` (sorted keys, no whitespace, ASCII, finite numbers).

    Raises:
        StudyError: for a value JSON cannot hold (bytes, a date, NaN, a non-string key).
    """
    try:
        return json.dumps(_plain(value, "manifest"), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False).encode("ascii")
    except ValueError as exc:
        raise StudyError(str(exc)) from None


def _plain(value: object, where: str) -> object:
    """``value`` as JSON types only (tuples become lists); StudyError naming the field otherwise."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise StudyError(f"{where}: key {k!r} is not a string")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise StudyError(f"{where}: {value} is not a finite number")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise StudyError(f"{where}: {type(value).__name__} is not a JSON value")


@dataclass(frozen=True)
class StudyManifest:
    """What every member agrees to train: all fields are covered by :attr:`digest`."""

    #: the study's name, e.g. ``"cardio-xray-2026"`` (1-64 of ``[A-Za-z0-9._-]``)
    name: str
    #: bumped by the proposer for each changed manifest (the digest changes anyway)
    version: int
    #: the federation id every member's peer.toml names
    federation: str
    #: the task, e.g. ``"catheter"``
    task: str
    #: the architecture: the hello's model id (``catheter/tiny``, ``organs/BasicUNet/<args digest>``)
    model: str
    #: strategy name and its parameters (JSON values)
    strategy: str
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    #: ``count``, ``local_steps``, ``batch_size``, ``lr`` of ``[rounds]``
    rounds: Mapping[str, Any] = field(default_factory=dict)
    #: ``[privacy]`` (:data:`PRIVACY_KEYS`), or None: no DP-SGD
    privacy: Mapping[str, Any] | None = None
    #: member PeerIDs, sorted and unique
    members: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("name", "federation"):
            value = getattr(self, name)
            if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
                raise StudyError(f"manifest.{name}: use 1-64 letters, digits, '-', '_' or '.', got {value!r}")
        if type(self.version) is not int or self.version < 1:
            raise StudyError(f"manifest.version: must be an integer >= 1, got {self.version!r}")
        for name in ("task", "model", "strategy"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 0 < len(value.encode()) <= 128:
                raise StudyError(f"manifest.{name}: must be a string of 1-128 bytes, got {value!r}")
        if STUDY_SEPARATOR in self.model:
            raise StudyError(f"manifest.model: must not contain {STUDY_SEPARATOR!r}")
        if len(hello_model(self.model, bytes(32)).encode()) > MAX_HELLO_MODEL_BYTES:
            raise StudyError(f"manifest.model: {self.model!r} is too long to travel with a study digest "
                             f"(the hello's model holds {MAX_HELLO_MODEL_BYTES} bytes)")
        if not isinstance(self.strategy_params, Mapping):
            raise StudyError("manifest.strategy.params: must be an object")
        if not isinstance(self.rounds, Mapping) or sorted(self.rounds) != sorted(ROUND_KEYS):
            raise StudyError(f"manifest.rounds: must hold exactly {', '.join(ROUND_KEYS)}")
        for key in ROUND_KEYS:
            value = self.rounds[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise StudyError(f"manifest.rounds.{key}: must be a number, got {value!r}")
        if self.privacy is not None and (not isinstance(self.privacy, Mapping)
                                         or sorted(self.privacy) != sorted(PRIVACY_KEYS)):
            raise StudyError(f"manifest.privacy: must be null or hold exactly {', '.join(PRIVACY_KEYS)}")
        members = tuple(self.members)
        if not 1 <= len(members) <= MAX_MEMBERS:
            raise StudyError(f"manifest.members: must list 1-{MAX_MEMBERS} PeerIDs")
        for i, member in enumerate(members):
            try:
                public_key_from_peer_id(member)
            except (PeerIdError, TypeError) as exc:
                raise StudyError(f"manifest.members[{i}]: {exc}") from None
        if list(members) != sorted(set(members)):
            raise StudyError("manifest.members: must be sorted and list each PeerID once")
        object.__setattr__(self, "members", members)
        canonical_json(self.to_json())  # every value is JSON (StudyError naming the field otherwise)

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON object the digest covers."""
        return {
            "format": STUDY_FORMAT,
            "name": self.name,
            "version": self.version,
            "federation": self.federation,
            "task": {"name": self.task, "model": self.model},
            "strategy": {"name": self.strategy, "params": dict(self.strategy_params)},
            "rounds": dict(self.rounds),
            "privacy": None if self.privacy is None else dict(self.privacy),
            "members": list(self.members),
        }

    @classmethod
    def from_json(cls, data: object) -> StudyManifest:
        """Read a manifest object, checking every key.

        Raises:
            StudyError: naming the first missing, unknown or invalid field.
        """
        top = _object(data, "manifest", ("format", "name", "version", "federation", "task", "strategy", "rounds",
                                         "privacy", "members"))
        if top["format"] != STUDY_FORMAT:
            raise StudyError(f"manifest.format: expected {STUDY_FORMAT!r}, got {top['format']!r}")
        task = _object(top["task"], "manifest.task", ("name", "model"))
        strategy = _object(top["strategy"], "manifest.strategy", ("name", "params"))
        rounds = _object(top["rounds"], "manifest.rounds", ROUND_KEYS)
        privacy = None if top["privacy"] is None else _object(top["privacy"], "manifest.privacy", PRIVACY_KEYS)
        if not isinstance(top["members"], list):
            raise StudyError("manifest.members: must be a list of PeerIDs")
        return cls(
            name=top["name"],
            version=top["version"],
            federation=top["federation"],
            task=task["name"],
            model=task["model"],
            strategy=strategy["name"],
            strategy_params=_object(strategy["params"], "manifest.strategy.params", None),
            rounds=rounds,
            privacy=privacy,
            members=tuple(top["members"]),
        )

    def canonical(self) -> bytes:
        """The canonical JSON the digest and the proposer's signature cover."""
        return canonical_json(self.to_json())

    @property
    def digest(self) -> bytes:
        """``BLAKE2b-256(DIGEST_DOMAIN || canonical JSON)``: the study's name on the wire and in audit logs."""
        return hashlib.blake2b(DIGEST_DOMAIN + self.canonical(), digest_size=32).digest()

    def sign(self, identity: Identity) -> SignedStudy:
        """This manifest proposed by ``identity`` (which must be a member).

        Raises:
            StudyError: if ``identity`` is not a member.
        """
        proposer = peer_id_from_public_key(identity.public_key)
        if proposer not in self.members:
            raise StudyError(f"proposer: {proposer} is not a member of the study")
        return SignedStudy(self, proposer, identity.sign(SIGNING_DOMAIN + self.digest))


def _object(data: object, where: str, keys: tuple[str, ...] | None) -> dict[str, Any]:
    """``data`` as a dict with exactly ``keys`` (any string keys when None)."""
    if not isinstance(data, dict):
        raise StudyError(f"{where}: must be an object")
    if keys is not None:
        missing = [k for k in keys if k not in data]
        if missing:
            raise StudyError(f"{where}.{missing[0]}: required field is missing")
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise StudyError(f"{where}.{unknown[0]}: unknown field")
    return data


@dataclass(frozen=True)
class SignedStudy:
    """A manifest with its proposer's signature over the digest."""

    manifest: StudyManifest
    proposer: str
    signature: bytes

    @property
    def digest(self) -> bytes:
        return self.manifest.digest

    @property
    def digest_hex(self) -> str:
        return self.manifest.digest.hex()

    @property
    def label(self) -> str:
        """``name v<version> (<12 hex digits>)``, for messages and audit entries."""
        return f"{self.manifest.name} v{self.manifest.version} ({self.digest_hex[:12]})"

    def verify(self) -> None:
        """Check the proposer is a member and signed this manifest's digest.

        Raises:
            StudyError: if not.
        """
        if self.proposer not in self.manifest.members:
            raise StudyError(f"proposer: {self.proposer} is not a member of the study")
        key = public_key_from_peer_id(self.proposer)
        if not verify_signature(key, SIGNING_DOMAIN + self.digest, self.signature):
            raise StudyError("signature: does not verify by the proposer's key (the manifest was changed "
                             "after signing, or signed by someone else)")

    def to_bytes(self) -> bytes:
        """The study file: readable JSON (indented, sorted keys); the digest is recomputed on reading."""
        doc = {"manifest": self.manifest.to_json(), "proposer": self.proposer, "signature": self.signature.hex()}
        return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n").encode()


def read_study(data: bytes) -> SignedStudy:
    """Parse and verify a study file.

    Raises:
        StudyError: naming what is wrong (size, JSON, a field, the proposer, the signature).
    """
    if len(data) > MAX_STUDY_BYTES:
        raise StudyError(f"the study file is larger than {MAX_STUDY_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StudyError(f"not a JSON study file: {exc}") from None
    top = _object(doc, "study", ("manifest", "proposer", "signature"))
    manifest = StudyManifest.from_json(top["manifest"])
    proposer, signature = top["proposer"], top["signature"]
    if not isinstance(proposer, str):
        raise StudyError("proposer: must be a PeerID")
    if not isinstance(signature, str) or re.fullmatch(r"[0-9a-f]{128}", signature) is None:
        raise StudyError("signature: must be 128 lowercase hex digits")
    study = SignedStudy(manifest, proposer, bytes.fromhex(signature))
    study.verify()
    return study


def _no_constant(name: str) -> object:
    raise StudyError(f"manifest: {name} is not a finite number")


def manifest_differences(expected: StudyManifest, actual: StudyManifest) -> list[str]:
    """Each field whose value differs, as ``"field: study X, here Y"`` (dotted names, in order)."""
    a, b = _flatten(expected.to_json()), _flatten(actual.to_json())
    out = []
    for key in dict.fromkeys([*a, *b]):
        if a.get(key, _ABSENT) != b.get(key, _ABSENT):
            out.append(f"{key}: study {_show(a.get(key, _ABSENT))}, here {_show(b.get(key, _ABSENT))}")
    return out


_ABSENT = object()


def _show(value: object) -> str:
    return "absent" if value is _ABSENT else json.dumps(value, sort_keys=True)


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: value}


def hello_model(model_id: str, digest: bytes | None) -> str:
    """The hello's ``model``: ``MODEL_ID`` alone, or ``MODEL_ID@<hex digest>`` under a study."""
    return model_id if digest is None else f"{model_id}{STUDY_SEPARATOR}{digest.hex()}"


def split_hello_model(model: str) -> tuple[str, str]:
    """A hello's ``model`` as (model id, study digest hex or ``""`` when it names no study)."""
    head, sep, tail = model.rpartition(STUDY_SEPARATOR)
    if sep and _HEX64_RE.fullmatch(tail):
        return head, tail
    return model, ""
