"""What a notification says: a line for people, the webhook's JSON body, its signature.

The signature follows the scheme GitHub and Stripe webhooks made familiar: the
receiver recomputes ``HMAC-SHA256(secret, "<timestamp>." + body)`` over the exact
bytes it received and compares it, in constant time, with the
``X-Orchestrate-Signature: sha256=<hex>`` header; the timestamp header is inside
what is signed, so an old delivery cannot be replayed later with a fresh one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from orchestrator.events import Event, Kind

SIGNATURE_HEADER = "X-Orchestrate-Signature"
TIMESTAMP_HEADER = "X-Orchestrate-Timestamp"
EVENT_HEADER = "X-Orchestrate-Event"
# The same for every attempt of one delivery: a receiver can drop a repeat.
DELIVERY_HEADER = "X-Orchestrate-Delivery"
# How old a signed timestamp verify() accepts by default (clock skew and retries).
TOLERANCE_S = 300.0

# Enough of a reason for a chat line; the webhook body carries it whole.
_MAX_REASON_CHARS = 500


def _reason(event: Event) -> str:
    reason = (event.reason or "").strip().replace("\n", " ")
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[:_MAX_REASON_CHARS] + "..."
    return f": {reason}" if reason else ""


def _stage(event: Event) -> str:
    if event.stage is not None and event.stages is not None:
        return f"stage {event.stage}/{event.stages}"
    return "the promotion" if event.stages is not None else "the next step"


# What each kind of event says after "orchestrate <release>: ", filled in by text().
_LINES: dict[Kind, str] = {
    Kind.STARTED: "release started",
    Kind.STAGE_PASSED: "{stage} passed{weight}",
    # "stage 3/4" (the machine's details say "stage 3"), or "the promotion".
    Kind.AWAITING_APPROVAL: ("waiting for approval of {stage} (`orchestrate promote "
                             "--release {release}`)"),
    Kind.ROLLING_BACK: "rolling back from {state}{reason}",
    Kind.ROLLED_BACK: "rolled back, all traffic on blue{reason}",
    Kind.FAILED: "FAILED in {state}, waiting for a person{reason}",
    Kind.PROMOTED: "promoted, green takes all traffic; the rollback window is open",
    Kind.WINDOW_CLOSED: "rollback window closed, cleaning up",
    Kind.DONE: "done",
    Kind.MEASUREMENT: "{check} = {value} ({verdict}) at {stage}",
}


def text(event: Event) -> str:
    """One short line: which release, what happened, at which stage, and why."""
    r = f"orchestrate {event.release}"
    line = _LINES.get(event.kind)
    if line is None:
        return f"{r}: {event.kind.value} {event.state or ''}".rstrip()
    d = event.details
    weight = f", {event.weight}% of traffic on green" if event.weight is not None else ""
    return f"{r}: " + line.format(
        stage=_stage(event), weight=weight, release=event.release, state=event.state,
        reason=_reason(event), check=d.get("check"), value=d.get("value"),
        verdict=d.get("verdict"))


def title(event: Event) -> str:
    return f"orchestrate {event.release}: {event.kind.value.replace('_', ' ')}"


def webhook_body(event: Event, labels: Mapping[str, str]) -> bytes:
    """The exact bytes that are sent and signed."""
    body: dict[str, Any] = {**event.as_dict(), "text": text(event), "labels": dict(labels)}
    # default=str: a detail that is not JSON (a Decimal from PostgreSQL) must not
    # cost the notification.
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def slack_body(event: Event) -> bytes:
    return json.dumps({"text": text(event)}).encode()


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    timestamp = str(int(now if now is not None else time.time()))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(secret, timestamp, body)}


def verify(secret: str, body: bytes, headers: Mapping[str, str], *,
           tolerance: float = TOLERANCE_S, now: float | None = None) -> bool:
    """What a receiver does (in Python); docs/notifications.md shows it in shell too.
    ``headers`` as received; names are matched case-insensitively."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp = lower.get(TIMESTAMP_HEADER.lower(), "")
    given = lower.get(SIGNATURE_HEADER.lower(), "")
    try:
        age = (now if now is not None else time.time()) - int(timestamp)
    except ValueError:
        return False
    if abs(age) > tolerance:
        return False
    return hmac.compare_digest(given, signature(secret, timestamp, body))
