"""structlog set-up: JSON for machines (CI, Kubernetes, pipes), console for a person.

Secrets never reach a log line: keys that name a secret are masked; libpq
conninfo/URI passwords, Authorization header values, credentials after "Bearer" that
look like a credential, and every secret value registered with ``register_secret``
are scrubbed from any string value. Prose is left alone: "missing or wrong bearer
token" stays searchable.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

_SECRET_KEYS = re.compile(r"pass(word)?|secret|token|conninfo|dsn|authorization", re.I)
_CONNINFO_PW = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)
_URI_PW = re.compile(r"(postgres(?:ql)?://[^:/@\s]+:)([^@\s]+)(@)", re.I)
# An Authorization header as logged: "Authorization: <scheme> <value>", a header dict's
# repr or JSON ("'authorization': '...'"), or authorization=... in key=value text.
_AUTH_HEADER = re.compile(
    r"""(authorization["']?\s*[:=]\s*["']?)(?:[A-Za-z][A-Za-z0-9-]*\s+)?[^\s"',;]+""", re.I)
# "Bearer <credential>" elsewhere: only when what follows looks like a credential
# (a digit or token punctuation in it, or 20+ characters), not an English word.
_BEARER = re.compile(
    r"(\bbearer\s+)(?=[A-Za-z0-9._~+/=-]*[0-9._~+/=-]|[A-Za-z0-9._~+/=-]{20})"
    r"[A-Za-z0-9._~+/=-]+", re.I)
# Secrets worth masking wherever they appear; shorter values would mask common words.
_MIN_REGISTERED = 8
_registered: set[str] = set()


def register_secret(value: str) -> None:
    """Mask this exact value in every later log line (a token the process holds)."""
    if len(value) >= _MIN_REGISTERED:
        _registered.add(value)


def scrub(text: str) -> str:
    """Remove passwords and tokens from free text (error messages, SQL, commands)."""
    for secret in _registered:
        if secret in text:
            text = text.replace(secret, "***")
    text = _CONNINFO_PW.sub(r"\1***", text)
    text = _URI_PW.sub(r"\1***\3", text)
    text = _AUTH_HEADER.sub(r"\1***", text)
    return _BEARER.sub(r"\1***", text)


def _redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if _SECRET_KEYS.search(key):
            event_dict[key] = "***"
        elif isinstance(value, str):
            event_dict[key] = scrub(value)
    return event_dict


def choose_format() -> Literal["json", "console"]:
    forced = os.environ.get("ORCHESTRATE_LOG_FORMAT", "").lower()
    if forced in {"json", "console"}:
        return forced  # type: ignore[return-value]
    if os.environ.get("KUBERNETES_SERVICE_HOST") or os.environ.get("CI"):
        return "json"
    return "console" if sys.stderr.isatty() else "json"


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(file=sys.stderr)


def configure(*, debug: bool = False, fmt: Literal["json", "console"] | None = None) -> None:
    fmt = fmt or choose_format()
    level = logging.DEBUG if debug else logging.INFO
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # sys.stderr is looked up per logger, not bound once: whoever swaps it later
        # (a test's capture, a daemon redirecting) must not leave logs pointing at a
        # closed stream.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()
