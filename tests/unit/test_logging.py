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


REFUSAL = "alert refused: missing or wrong bearer token"


@pytest.mark.parametrize("prose", [
    REFUSAL,
    "Bearer tokens are compared in constant time",
    "set the bearer token in http_config.authorization.credentials",
])
def test_prose_about_tokens_is_left_alone(prose: str) -> None:
    # On main every word after "bearer" became ***: "missing or wrong bearer ***".
    assert logs.scrub(prose) == prose


@pytest.mark.parametrize("text", [
    "Authorization: Bearer {t}",
    "headers={{'Authorization': 'Bearer {t}'}}",
    '{{"authorization": "Basic {t}"}}',
    "authorization=Bearer {t}",
    "curl -H 'Bearer {t}'",
])
def test_credentials_where_they_are_logged_are_scrubbed(text: str) -> None:
    token = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
    out = logs.scrub(text.format(t=token))
    assert token not in out and "***" in out


def test_a_registered_token_never_reaches_a_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    # A token made of plain letters looks like a word; the receiver registers its own.
    token = "correcthorsebatterystaplecorrecthorse"
    logs.register_secret(token)
    logs.configure(fmt="json")
    try:
        log = structlog.get_logger()
        log.warning(REFUSAL, client="127.0.0.1")
        log.info("odd client", note=f"sent {token} as a query parameter", header=token)
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert token not in err
    events = [json.loads(line) for line in err.strip().splitlines()]
    # The documented message is findable verbatim.
    assert events[0]["event"] == REFUSAL
    assert events[1]["note"] == "sent *** as a query parameter"
