"""Alertmanager's webhook body (payload version 4) -> alerts, or a PayloadError (400)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# Alertmanager batches alerts of one group; even hundreds of alerts stay far below this.
MAX_BODY_BYTES = 1024 * 1024
PAYLOAD_VERSION = "4"
# Alertmanager's "no time" (an alert without a known start or end).
_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


class PayloadError(ValueError):
    """The body is not an Alertmanager webhook payload."""


@dataclass(frozen=True)
class Alert:
    status: str  # firing / resolved
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    starts_at: str | None = None
    fingerprint: str | None = None
    started: datetime | None = None  # starts_at parsed; None when absent or zero

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "unnamed alert")

    def describe(self) -> str:
        summary = self.annotations.get("summary") or self.annotations.get("description")
        return f"alert {self.name} firing" + (f": {summary}" if summary else "")


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{what} must be an object")
    return {str(k): str(v) for k, v in value.items()}


def _timestamp(value: Any, what: str) -> datetime | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{what} must be an RFC 3339 time string")
    try:
        # Alertmanager writes nanoseconds; fromisoformat keeps microseconds.
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PayloadError(f"{what} {value!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return None if parsed <= _ZERO_TIME else parsed


def parse_payload(raw: bytes) -> list[Alert]:
    """The alerts of an Alertmanager webhook body (payload version 4)."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"the body is not JSON: {exc}") from None
    except RecursionError:
        # A body of 100k "[" is far below the size cap and would otherwise escape as
        # a traceback and a dropped connection.
        raise PayloadError("the body nests too deeply to be an Alertmanager payload") from None
    if not isinstance(doc, dict):
        raise PayloadError("the body must be a JSON object")
    version = doc.get("version")
    if version is not None and str(version) != PAYLOAD_VERSION:
        raise PayloadError(f"payload version {version!r} is not supported; Alertmanager's "
                           f"webhook sends version {PAYLOAD_VERSION!r}")
    alerts = doc.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("'alerts' must be a list (is this an Alertmanager webhook?)")
    out = []
    for i, item in enumerate(alerts):
        if not isinstance(item, dict):
            raise PayloadError(f"alerts[{i}] must be an object")
        status = item.get("status", doc.get("status"))
        if status not in {"firing", "resolved"}:
            raise PayloadError(f"alerts[{i}].status must be 'firing' or 'resolved', "
                               f"got {status!r}")
        fingerprint = item.get("fingerprint")
        out.append(Alert(
            status=status,
            labels=_str_map(item.get("labels"), f"alerts[{i}].labels"),
            annotations=_str_map(item.get("annotations"), f"alerts[{i}].annotations"),
            starts_at=item.get("startsAt") if isinstance(item.get("startsAt"), str) else None,
            fingerprint=None if fingerprint is None else str(fingerprint),
            started=_timestamp(item.get("startsAt"), f"alerts[{i}].startsAt"),
        ))
    return out
