"""``notifications``: who is told about a release's milestones (orchestrator/notify/)."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from orchestrator.config._base import (
    Duration,
    Name,
    SecretRef,
    ValueOrSecret,
    _Model,
    more_than_zero,
)
from orchestrator.events import Kind

# What a target hears unless its ``events`` say otherwise: the milestones a person
# acts on, not the per-state and per-measurement chatter.
MILESTONES: tuple[Kind, ...] = (
    Kind.STARTED, Kind.STAGE_PASSED, Kind.AWAITING_APPROVAL, Kind.ROLLING_BACK,
    Kind.ROLLED_BACK, Kind.FAILED, Kind.PROMOTED, Kind.WINDOW_CLOSED, Kind.DONE)

_BY_REFERENCE = ("a secret is given by reference, never by value: {env: NAME} or "
                 "{file: /path}")


def _secret_ref(value: Any) -> Any:
    # A literal would sit in the config file, in the stored config and in backups.
    if value is not None and not isinstance(value, dict | SecretRef):
        raise ValueError(_BY_REFERENCE)
    return value


class UrlRef(ValueOrSecret):
    """A target's URL: written out, or read when the release starts from an
    environment variable or a file (a Slack or Teams URL is itself a credential)."""

    forms: ClassVar[str] = ("a URL is a string, or {env: NAME} or {file: /path} (exactly "
                            "one of them) when it holds a token")


class NotifyTarget(_Model):
    """One receiver of notifications. ``webhook``: a JSON POST of the event, signed
    with HMAC-SHA256 when ``secret`` is set; ``slack``: a Slack-compatible incoming
    webhook (``{"text": ...}``, also Mattermost, Rocket.Chat); ``apprise``: every
    URL of ``urls`` through the apprise library (Teams, email, PagerDuty, ...).
    See docs/notifications.md."""

    kind: Literal["webhook", "slack", "apprise"]
    # How logs name the target (never by its URL): default the kind and its position.
    name: Name | None = None
    url: UrlRef | None = None
    urls: list[UrlRef] = Field(default_factory=list)
    secret: Annotated[SecretRef | None, BeforeValidator(_secret_ref)] = None
    # Default: the milestones (MILESTONES); `state` and `measurement` only on request.
    events: list[Kind] | None = None
    # Per attempt; a failed attempt is retried `retries` times with backoff.
    timeout: Annotated[Duration, more_than_zero("a target's timeout must be more than 0s")] = 5.0
    retries: int = Field(default=3, ge=0, le=10)
    # The first wait between attempts; it doubles (at most 5s, or this), with jitter.
    backoff: Duration = Field(default=0.5, gt=0, le=60)
    # Added to the webhook's JSON body under `labels` (over notifications.labels).
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("events")
    @classmethod
    def _some_events(cls, events: list[Kind] | None) -> list[Kind] | None:
        if events is not None and not events:
            raise ValueError("events: [] would send nothing; leave it out for the "
                             "milestones, or remove the target")
        return events

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> NotifyTarget:
        if self.kind == "apprise":
            if self.url is not None:
                raise ValueError("url: an apprise target takes `urls` (a list)")
            if not self.urls:
                raise ValueError("urls: an apprise target needs at least one apprise URL")
        else:
            if self.urls:
                raise ValueError(f"urls: a {self.kind} target takes one `url`")
            if self.url is None:
                raise ValueError(f"url: a {self.kind} target needs a url")
            literal = self.url.value
            if literal is not None and not re.match(r"^https?://[^/\s]+", literal):
                raise ValueError("url: not an http:// or https:// URL")
        if self.secret is not None and self.kind != "webhook":
            raise ValueError(f"secret: only a webhook target signs its body, not {self.kind}")
        return self

    def wants(self, kind: Kind) -> bool:
        return kind in (self.events if self.events is not None else MILESTONES)


class NotificationsConfig(_Model):
    """Notifications of the release's milestones, sent from a thread of their own
    with bounded retries: a dead or slow receiver never slows or stops a release."""

    targets: list[NotifyTarget] = Field(default_factory=list)
    # Added to every webhook body (service, namespace and version are there already).
    labels: dict[str, str] = Field(default_factory=dict)
    # Events waiting to be sent; when full, the oldest is dropped (with a warning).
    queue_size: int = Field(default=200, ge=1, le=100_000)
    # When the release process ends, how long it waits for the queue to drain.
    flush_timeout: Duration = Field(default=3.0, le=30)

    @model_validator(mode="after")
    def _distinct_names(self) -> NotificationsConfig:
        names = [t.name for t in self.targets if t.name is not None]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"targets: the name {dupes[0]!r} is used twice")
        return self
