"""Notifications of a release's milestones: a signed generic webhook, Slack-compatible
incoming webhooks, and anything apprise reaches (docs/notifications.md).

``attach_notifications`` is what ``wiring.release_for`` calls: with targets
configured it adds a ``NotificationSink`` to the release's events. The sink sends
from a thread of its own, so a dead or slow receiver never slows or stops a release.
"""

from __future__ import annotations

from orchestrator.config import ReleaseConfig
from orchestrator.events import Events
from orchestrator.notify.messages import signature, verify
from orchestrator.notify.sink import NotificationSink

__all__ = ["NotificationSink", "attach_notifications", "signature", "verify"]


def attach_notifications(cfg: ReleaseConfig, events: Events | None = None) -> Events:
    """``events`` (or new ones) with the configured notification targets added."""
    events = events if events is not None else Events()
    if cfg.notifications.targets:
        release = cfg.release
        events.sinks.append(NotificationSink(cfg.notifications, {
            "service": release.service, "namespace": release.namespace,
            "version": release.version}))
    return events
