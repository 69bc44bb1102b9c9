"""The endpoint: what it derives from a database's config, and that nothing else does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from orchestrator.config import DatabaseConfig, GreenConfig
from orchestrator.pg.endpoint import Endpoint

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"
# The only modules that may read a DatabaseConfig: the schema, the endpoint, and the
# connection primitive it delegates to.
ALLOWED = {"config", "pg/endpoint.py", "pg/conn.py", "sandbox"}


def _db(**extra: object) -> DatabaseConfig:
    return DatabaseConfig.model_validate({
        "host": "db.internal", "port": 5433, "dbname": "app", "user": "owner",
        "password": {"env": "ORCH_TEST_ENDPOINT_PW"}, **extra})


def test_the_password_travels_in_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_TEST_ENDPOINT_PW", "s3cret")
    end = Endpoint(_db(), "blue")
    assert end.tool_env()["PGPASSWORD"] == "s3cret"
    assert end.tool_settings()["PGPASSWORD"] == "s3cret"
    assert "s3cret" not in end.tool_conninfo()
    assert "host=db.internal port=5433 dbname=app user=owner" in end.tool_conninfo()
    assert "s3cret" not in end.describe() and end.describe() == "owner@db.internal:5433/app"


def test_the_peer_reaches_the_peer_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_TEST_ENDPOINT_PW", "s3cret")
    end = Endpoint(_db(peer_host="blue.svc", peer_port=6432), "blue")
    assert "host=blue.svc port=6432" in end.peer_conninfo()
    assert "password=s3cret" in end.peer_conninfo()
    redacted = end.redacted_peer_conninfo()
    assert "s3cret" not in redacted and redacted.endswith("password=***")
    assert "host=blue.svc port=6432" in redacted


def test_boundary_conversion_and_derived_endpoints() -> None:
    end = Endpoint(_db(connect_timeout=10), "green")
    assert Endpoint.of(end, "blue") is end
    assert Endpoint.of(_db(), "blue") == Endpoint(_db(), "blue")
    capped = end.with_connect_timeout(3)
    assert capped.db.connect_timeout == 3 and capped.role == "green"
    assert end.with_connect_timeout(30).db.connect_timeout == 10
    assert not end.create_database  # only green's section may create its database
    green = GreenConfig.model_validate({"dbname": "app", "user": "owner"})
    assert Endpoint(green, "green").create_database
    assert not Endpoint(green.model_copy(update={"create_database": False}),
                        "green").create_database


def test_only_the_endpoint_reads_a_database_config() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED or rel.split("/")[0] in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("orchestrator.config"):
                named = {a.name for a in node.names} & {"DatabaseConfig", "GreenConfig"}
                offenders += [f"{rel}: {name}" for name in sorted(named)]
    assert offenders == []
