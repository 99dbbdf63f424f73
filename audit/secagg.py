"""The ``local`` audit entries secure aggregation writes, and what reconciliation reads from them.

Each entry's ``reason`` is canonical JSON (sorted keys, no spaces), so that an auditor's
tools can read it back (docs/AUDIT.md, "What each direction records"):

* ``secagg-group`` (aggregator): ``{"group", "members", "threshold", "weight_cap", "bits", "clip"}``;
  (member, ``peer`` = the aggregator): ``{"group", "members", "threshold", "weight_cap", "bits", "clip"}``
  with ``members`` the group's size;
* ``secagg-commit`` (aggregator, ``payload_digest`` = the commit digest): ``{"group", "dealers",
  "survivors", "dropped", "signature"}``, members as PeerIDs, written before any member sees it;
* ``secagg-release`` (member, ``peer`` = the aggregator, ``payload_digest`` = the commit digest
  it answered): ``{"group", "commit", "signature", "survivors", "dropped"}``;
* ``secagg-sum`` (aggregator, ``payload_digest`` = the state digest of the new model):
  ``{"group", "commit", "survivors", "releases", "bound"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["COMMIT_KIND", "GROUP_KIND", "RELEASE_KIND", "SECAGG_KINDS", "SUM_KIND", "canonical", "read_reason"]

GROUP_KIND: Final = "secagg-group"
COMMIT_KIND: Final = "secagg-commit"
RELEASE_KIND: Final = "secagg-release"
SUM_KIND: Final = "secagg-sum"
SECAGG_KINDS: Final = (GROUP_KIND, COMMIT_KIND, RELEASE_KIND, SUM_KIND)


def canonical(fields: Mapping[str, Any]) -> str:
    """The ``reason`` text of a secure-aggregation entry: canonical JSON."""
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), allow_nan=False)


def read_reason(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fields of a ``local`` secure-aggregation entry, or None if its reason is not a JSON object."""
    try:
        value = json.loads(str(entry.get("reason") or ""))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
