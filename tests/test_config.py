"""peer.toml validation: good files load, every bad field is named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from silomesh.peer.config import ConfigError, load_config
from silomesh.peer.identity import PeerIdentity

NEIGHBOUR = PeerIdentity.from_seed(b"\x05" * 32)

GOOD = f"""
federation = "cardio-2026"
key_file = "peer.key"
listen = "/ip4/127.0.0.1/tcp/4001"
data_dir = "state"
participation = "manual"

[task]
name = "catheter"
size = "small"

[strategy]
name = "fedefm"
params = {{ beta = 0.5 }}

[rounds]
count = 10
deadline_seconds = 120
local_steps = 20

[[trusted]]
name = "st-elsewhere"
peer_id = "{NEIGHBOUR.peer_id_text}"
address = "/ip4/10.1.2.3/tcp/4001"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peer.toml"
    path.write_text(text)
    return path


def test_good_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.federation == "cardio-2026"
    assert cfg.key_file == tmp_path.resolve() / "peer.key"
    assert cfg.store == tmp_path.resolve() / "state" / "store.sqlite"
    assert cfg.participation == "manual"
    assert cfg.strategy.params == {"beta": 0.5}
    assert cfg.rounds.deadline_seconds == 120.0
    assert cfg.trusted[0].public_key == NEIGHBOUR.public_key
    assert cfg.trusted[0].name == "st-elsewhere"


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('federation = "cardio-2026"', 'federation = "bad id!"', "federation"),
        ('key_file = "peer.key"\n', "", "key_file: required"),
        ('participation = "manual"', 'participation = "sometimes"', "participation"),
        ("count = 10", "count = -1", "rounds.count"),
        ("deadline_seconds = 120", 'deadline_seconds = "soon"', "rounds.deadline_seconds"),
        ("local_steps = 20", "local_steps = 0", "rounds.local_steps"),
        (f'peer_id = "{NEIGHBOUR.peer_id_text}"', 'peer_id = "12D3KooWnotakey"', "trusted[0].peer_id"),
        ('address = "/ip4/10.1.2.3/tcp/4001"', 'address = "10.1.2.3:4001"', "trusted[0].address"),
        ('listen = "/ip4/127.0.0.1/tcp/4001"', 'listen = "/ip4/127.0.0.1/tcp/99999"', "listen"),
        ('size = "small"', 'size = "small"\ncolour = "red"', "task.colour: unknown field"),
    ],
)
def test_bad_field_is_named_in_the_error(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_config(_write(tmp_path, GOOD.replace(old, new)))


def test_peer_listed_twice_is_refused(tmp_path: Path) -> None:
    twice = GOOD + GOOD[GOOD.index("[[trusted]]") :]
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(_write(tmp_path, twice))


def test_control_api_off_loopback_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"control\.host"):
        load_config(_write(tmp_path, GOOD + '\n[control]\nhost = "0.0.0.0"\n'))


def test_missing_file_and_invalid_toml_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "federation = = 1"))
