"""One sender per configured target: a single attempt at telling it about an event.

The sink (``orchestrator/notify/sink.py``) retries. A sender raises ``Undelivered``
(a ``TransientError``: no answer, or one that says "try again") or ``Refused`` (the
receiver said no; asking again cannot help). Neither message holds the target's URL:
a Slack or Teams URL is a credential, so a sender names its target by ``name`` only
and quotes a transport failure by its class, never by its text (which quotes the URL).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import requests

from orchestrator.config import NotifyTarget
from orchestrator.errors import OrchestrateError
from orchestrator.events import Event, Kind
from orchestrator.logging import register_secret
from orchestrator.notify import messages
from orchestrator.retry import TransientError

# Answers that say "try again later"; any other non-2xx answer is final.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class Refused(OrchestrateError):
    """The receiver answered and would not take the notification."""


class Undelivered(OrchestrateError, TransientError):
    """No answer, or one worth another attempt."""


class Sender(Protocol):
    name: str
    target: NotifyTarget

    def send(self, event: Event, delivery: str) -> None:
        """One attempt; raises Undelivered or Refused."""

    def forget(self, delivery: str) -> None:
        """The delivery is over (sent, or given up): drop what was kept for it."""

    def close(self) -> None: ...


def _hide(url: str) -> str:
    # The structlog processors mask a registered value wherever a line quotes it
    # (a library's exception text, a retry warning): the URL, and its path, where
    # Slack-style tokens live.
    register_secret(url)
    path = url.split("://", 1)[-1].partition("/")[2]
    if path:
        register_secret("/" + path)
    return url


class _HttpSender:
    """A JSON POST with requests: the generic webhook (signed) and Slack."""

    def __init__(self, name: str, target: NotifyTarget, labels: Mapping[str, str]) -> None:
        assert target.url is not None
        self.name = name
        self.target = target
        self.labels = {**labels, **target.labels}
        self.url = _hide(target.url.resolve())
        self.secret = target.secret.resolve() if target.secret is not None else None
        if self.secret is not None:
            register_secret(self.secret)
        self.session = requests.Session()

    def body(self, event: Event) -> bytes:
        if self.target.kind == "slack":
            return messages.slack_body(event)
        return messages.webhook_body(event, self.labels)

    def send(self, event: Event, delivery: str) -> None:
        body = self.body(event)
        headers = {"Content-Type": "application/json", "User-Agent": "orchestrate-notify"}
        if self.target.kind == "webhook":
            headers[messages.EVENT_HEADER] = event.kind.value
            headers[messages.DELIVERY_HEADER] = delivery
            if self.secret is not None:
                # Signed per attempt: a retry a minute later carries a fresh timestamp.
                headers.update(messages.signed_headers(self.secret, body))
        try:
            response = self.session.post(self.url, data=body, headers=headers,
                                         timeout=self.target.timeout, allow_redirects=False)
        except requests.Timeout as exc:
            raise Undelivered(f"no answer within {self.target.timeout:g}s") from exc
        except requests.RequestException as exc:
            raise Undelivered(f"cannot reach it ({type(exc).__name__})") from exc
        status = response.status_code
        response.close()
        if 200 <= status < 300:
            return
        if status in RETRY_STATUSES:
            raise Undelivered(f"HTTP {status}")
        raise Refused(f"HTTP {status}", hint="check the target's URL and what it expects")

    def forget(self, delivery: str) -> None:
        pass

    def close(self) -> None:
        self.session.close()


_APPRISE_TYPES = {Kind.FAILED: "failure", Kind.ROLLING_BACK: "failure",
                  Kind.ROLLED_BACK: "failure", Kind.PROMOTED: "success",
                  Kind.DONE: "success", Kind.AWAITING_APPROVAL: "warning"}


class _AppriseSender:
    """Every URL of the target through apprise, each retried on its own: a service
    that took the event is not sent it again because another one failed."""

    def __init__(self, name: str, target: NotifyTarget) -> None:
        import apprise

        # apprise logs through the standard library, with hosts and at times URLs in
        # its lines; with no handler configured they would reach stderr unscrubbed.
        # Our own lines say what failed, by the target's name.
        quiet = logging.getLogger("apprise")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        self.name = name
        self.target = target
        self.services: list[Any] = []
        for index, ref in enumerate(target.urls):
            service = apprise.Apprise.instantiate(_hide(ref.resolve()))
            if service is None:
                raise Refused(f"urls[{index}] is not an apprise URL apprise can use",
                              hint="see https://github.com/caronc/apprise/wiki for the forms")
            service.socket_connect_timeout = target.timeout
            service.socket_read_timeout = target.timeout
            self.services.append(service)
        self.pending: dict[str, set[int]] = {}

    def send(self, event: Event, delivery: str) -> None:
        left = self.pending.setdefault(delivery, set(range(len(self.services))))
        for index in sorted(left):
            if self.services[index].notify(body=messages.text(event),
                                           title=messages.title(event),
                                           notify_type=_APPRISE_TYPES.get(event.kind, "info")):
                left.discard(index)
        if left:
            raise Undelivered(f"urls{sorted(left)} did not take it")
        del self.pending[delivery]

    def forget(self, delivery: str) -> None:
        self.pending.pop(delivery, None)

    def close(self) -> None:
        self.pending.clear()


def build(name: str, target: NotifyTarget, labels: Mapping[str, str]) -> Sender:
    """Resolve the target's URL and secret; raises ConfigError (a reference that
    does not resolve) or Refused (an apprise URL apprise does not know)."""
    if target.kind == "apprise":
        return _AppriseSender(name, target)
    return _HttpSender(name, target, labels)


def new_delivery() -> str:
    return uuid.uuid4().hex
