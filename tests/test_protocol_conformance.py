"""The conformance suite in docs/conformance/ is what the generator writes, and the reference passes it.

The suite is data for second implementations (docs/conformance/README.md); these tests
keep it honest: (a) regenerating it with tests/make_conformance.py gives byte-identical
files, and (b) the reference implementation, run on each case as the JSON states it,
gives exactly the recorded outcome. A change of any outcome fails (b) until the files
are regenerated and committed, which shows the change in review.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from make_conformance import FORMAT, OUT, build, run_case

from silomesh.protocol import PROTOCOL_VERSION, ErrorCode

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
SUITES = ("envelopes.json", "sessions.json", "announces.json")


@cache
def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((OUT / name).read_text(encoding="utf-8"))
    return data


def _cases() -> list[tuple[str, str]]:
    return [(name, case["name"]) for name in SUITES for case in _load(name)["cases"]]


def test_regenerating_the_suite_gives_byte_identical_files() -> None:
    generated = build()
    on_disk = {p.name for p in OUT.glob("*.json")}
    assert on_disk == set(generated), "docs/conformance/ holds other files than the generator writes"
    for name, text in generated.items():
        assert (OUT / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run .venv/bin/python tests/make_conformance.py and review the diff"
        )


@pytest.mark.parametrize(("suite", "name"), _cases(), ids=[f"{s.split('.')[0]}:{n}" for s, n in _cases()])
def test_the_reference_gives_the_recorded_outcome(suite: str, name: str) -> None:
    data = _load(suite)
    case = next(c for c in data["cases"] if c["name"] == name)
    given = {k: v for k, v in case.items() if k != "expect"}
    assert run_case(data, given) == case["expect"]


def test_every_file_names_its_format_and_protocol_version() -> None:
    for name in (*SUITES, "vectors.json"):
        assert (_load(name)["format"], _load(name)["protocol_version"]) == (FORMAT, PROTOCOL_VERSION)


def _refusals(suite: str) -> set[str]:
    return {c["expect"]["code"] for c in _load(suite)["cases"] if c["expect"]["outcome"] == "refuse"}


def test_every_envelope_and_session_code_has_a_refusal_case() -> None:
    reachable = {code.value for code in ErrorCode} - {
        "UNEXPECTED_EOF",  # a stream event, not an envelope: still covered by sessions.json
        "STATE_MISMATCH",  # the peer-level codes are judged after the envelope is open
        "BAD_ROUND",
        "UNKNOWN_BASE",
        "REFUSED",
        "INTERNAL",
    }
    assert reachable <= _refusals("envelopes.json") | _refusals("sessions.json")
    assert "UNEXPECTED_EOF" in _refusals("sessions.json")


def test_each_suite_has_cases_where_two_checks_fail_at_once() -> None:
    for suite in SUITES:
        assert sum(c["name"].startswith("order-") for c in _load(suite)["cases"]) >= 3


def test_refusals_after_the_signature_are_answered_and_before_it_reset() -> None:
    answers = {
        (c["expect"]["code"], "reset" if c["expect"]["answer"] == "reset" else "error")
        for c in _load("envelopes.json")["cases"]
        if c["expect"]["outcome"] == "refuse" and c["name"] != "bad-type-unknown-error-code"
    }
    before = {"UNKNOWN_VERSION", "UNKNOWN_KIND", "UNTRUSTED_SENDER", "SENDER_MISMATCH", "BAD_SIGNATURE"}
    after = {"WRONG_RECIPIENT", "WRONG_FEDERATION", "STALE", "DIGEST_MISMATCH", "REPLAY", "DECRYPT_FAILED",
             "NON_FINITE", "BAD_SHAPE", "BAD_DTYPE", "BAD_TABLE"}
    both = {"TOO_LARGE", "BAD_FRAME", "BAD_MSGPACK", "BAD_TYPE"}  # in the header (reset) or the payload (error)
    assert {(code, "reset") for code in before | both} <= answers
    assert {(code, "error") for code in after | both} <= answers
    assert not {(code, "error") for code in before} & answers
    assert not {(code, "reset") for code in after} & answers


def test_int8_scalar_and_all_zero_cases_decode_as_documented() -> None:
    case = next(c for c in _load("envelopes.json")["cases"] if c["name"] == "update-int8-scalars-and-zeros")
    tensors = case["expect"]["message"]["tensors"]
    assert tensors["s"] == {"dtype": "float32", "shape": [], "data": "000020c0"}  # -2.5
    assert tensors["z"]["data"] == "00" * 16 and tensors["zs"] == {"dtype": "float32", "shape": [], "data": "00" * 4}


def test_the_section_13_vectors_are_the_published_ones() -> None:
    vectors = _load("vectors.json")
    doc = re.sub(r"\s+", "", DOC.read_text(encoding="utf-8"))
    published = [
        vectors["state"]["state_digest"],
        vectors["box_key_alice_bob"],
        vectors["ack"]["frame"],
        vectors["update"]["payload"],
        vectors["update"]["frame"],
        vectors["announce"]["bytes"],
        *(i["ed25519_public_key"] for n, i in vectors["identities"].items() if n != "carol"),
        vectors["identities"]["alice"]["peer_id"],
    ]
    assert all(value in doc for value in published)
    envelopes = {c["name"]: c for c in _load("envelopes.json")["cases"]}
    assert envelopes["vector-ack"]["input"] == vectors["ack"]["frame"][8:]
    assert envelopes["vector-update"]["input"] == vectors["update"]["frame"][8:]
    announces = {c["name"]: c for c in _load("announces.json")["cases"]}
    assert announces["vector-update-available"]["input"] == vectors["announce"]["bytes"]
