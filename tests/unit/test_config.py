"""Config validation: one clear error naming the field; secrets are references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import load_config, parse_config, parse_duration
from orchestrator.errors import ConfigError


def minimal(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "release": {"name": "r1"},
        "blue": {
            "host": "127.0.0.1",
            "port": 5432,
            "dbname": "shop",
            "user": "postgres",
            "password": {"env": "BLUE_PW"},
        },
        "green": {"host": "127.0.0.1", "port": 5433, "dbname": "shop", "user": "postgres"},
        "router": {"kind": "fake"},
        # The fake router has no metrics of its own: no default checks.
        "canary": {"checks": [], "allow_unanalysed": True},
    }
    if "canary" in over:
        canary = {**raw["canary"], **over.pop("canary")}
        if canary["checks"] or canary.get("builtin"):
            del canary["allow_unanalysed"]
        raw["canary"] = canary
    raw.update(over)
    return raw


def test_minimal_config_gets_safe_defaults(tmp_path: Path) -> None:
    cfg = parse_config(minimal(), base_dir=tmp_path)
    assert [s.weight for s in cfg.canary.stages] == [0, 5, 20, 100]
    assert cfg.state_db == cfg.blue
    assert cfg.migrations.dir == (tmp_path / "migrations").resolve()
    assert cfg.canary.on_inconclusive == "rollback"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["blue"].pop("dbname"), "blue.dbname"),
        (lambda r: r["blue"].update(port="not-a-port"), "blue.port"),
        (lambda r: r["green"].update(prot=5432), "green.prot"),
        (lambda r: r["router"].update(kind="traefik"), "router"),
        (lambda r: r.update(canary={"stages": [{"weight": 50}, {"weight": 20}]}), "canary.stages"),
        (
            lambda r: r.update(canary={"stages": [{"weight": 0, "duration": "soon"}]}),
            "canary.stages[0].duration",
        ),
        (lambda r: r["blue"].update(password={"env": "A", "file": "/x"}), "blue.password"),
        (lambda r: r["release"].update(name="Bad Name!"), "release.name"),
    ],
)
def test_one_clear_error_names_the_field(tmp_path: Path, mutate: Any, field: str) -> None:
    raw = minimal()
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    assert f"invalid configuration: {field}" in err.value.message
    assert err.value.exit_code == 2
    assert "nothing was changed" in (err.value.hint or "")


def test_same_database_twice_is_refused(tmp_path: Path) -> None:
    raw = minimal()
    raw["green"] = dict(raw["blue"])
    with pytest.raises(ConfigError, match="same database"):
        parse_config(raw, base_dir=tmp_path)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("release: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


def test_secret_resolution_and_conninfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(minimal(), base_dir=tmp_path)
    monkeypatch.delenv("BLUE_PW", raising=False)
    with pytest.raises(ConfigError, match="BLUE_PW is not set"):
        cfg.blue.conninfo()
    monkeypatch.setenv("BLUE_PW", "s3cr et'x")
    info = cfg.blue.conninfo()
    assert "password='s3cr et\\'x'" in info
    assert "s3cr" not in cfg.blue.describe()
    assert "password" not in cfg.blue.conninfo(with_password=False)
    assert cfg.blue.subprocess_env()["PGPASSWORD"] == "s3cr et'x"
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    raw = minimal()
    raw["green"]["password"] = {"file": str(secret)}
    cfg2 = parse_config(raw, base_dir=tmp_path)
    assert "password=from-file" in cfg2.green.conninfo()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25), (12, 12.0), ("1.5s", 1.5)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("tomorrow")


def test_release_digest_covers_what_was_written_not_defaults(tmp_path: Path) -> None:
    from orchestrator.machine import config_digest

    a, stored = config_digest(parse_config(minimal(), base_dir=tmp_path))
    b, _ = config_digest(parse_config(minimal(), base_dir=tmp_path))
    assert a == b and "canary" in stored  # the stored copy is complete
    explicit_default = minimal(canary={"interval": "10s"})
    changed = minimal(canary={"interval": "20s"})
    assert config_digest(parse_config(changed, base_dir=tmp_path))[0] != a
    # Writing a value the same as the default is still a change of what was written.
    assert config_digest(parse_config(explicit_default, base_dir=tmp_path))[0] != a
