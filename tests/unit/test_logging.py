"""Secrets never reach a log line."""

from __future__ import annotations

import json

import pytest
import structlog

from orchestrator import logging as logs


def test_scrub_removes_passwords_and_tokens() -> None:
    text = (
        "connection to host=db password=hunter2 user=x failed; "
        "uri postgresql://app:s3cret@db:5432/shop; Authorization: Bearer abc.def"
    )
    out = logs.scrub(text)
    assert "hunter2" not in out and "s3cret" not in out and "abc.def" not in out
    assert "password=***" in out
    assert "postgresql://app:***@db" in out


def test_quoted_conninfo_password_is_scrubbed() -> None:
    assert "two words" not in logs.scrub("password='two words' host=x")


def test_json_log_masks_secret_keys(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(fmt="json")
    structlog.get_logger().info(
        "connecting", password="hunter2", dsn="host=x password=y", note="password=zzz", user="app"
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    event = json.loads(line)
    assert event["password"] == "***" and event["dsn"] == "***"
    assert "zzz" not in event["note"]
    assert event["user"] == "app"
