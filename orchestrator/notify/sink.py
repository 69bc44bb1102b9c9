"""The notification sink: a bounded queue, and one daemon thread that sends.

``emit`` only appends to the queue (a full queue drops its oldest event with a
warning: the newest says how the release ends) and returns. The thread, started at
the first event, resolves the targets' URLs and secrets, then sends each event to
every target that wants it under the ``http`` retry policy, each attempt bounded by
the target's ``timeout``. ``close`` waits at most ``flush_timeout`` for the queue to
drain, then tells the thread to give up (its backoff sleeps end at once) and logs
how many events were not sent. A receiver that is down, slow or refusing costs the
release nothing but these log lines, which name the target, never its URL.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping

from orchestrator.config import NotificationsConfig, NotifyTarget
from orchestrator.errors import OrchestrateError
from orchestrator.events import Event
from orchestrator.logging import get_logger
from orchestrator.notify.senders import Refused, Sender, Undelivered, build, new_delivery
from orchestrator.retry import http_retrying

log = get_logger("orchestrate.notify")


class _GaveUp(Exception):
    """close() waited long enough: stop sending (not retried by any policy)."""


def target_names(targets: list[NotifyTarget]) -> list[str]:
    return [t.name or f"{t.kind}-{i + 1}" for i, t in enumerate(targets)]


class NotificationSink:
    def __init__(self, cfg: NotificationsConfig, labels: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.labels = {**labels, **cfg.labels}
        self.names = target_names(cfg.targets)
        self._queue: deque[Event] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._in_flight = 0
        self._give_up = threading.Event()
        self._thread: threading.Thread | None = None
        # For tests and the closing log line.
        self.sent = 0
        self.dropped = 0

    # ------------------------------------------------------------ release side

    def emit(self, event: Event) -> None:
        if not any(t.wants(event.kind) for t in self.cfg.targets):
            return
        with self._cond:
            if self._closing:
                log.debug("notification after close, not sent", kind=event.kind.value)
                return
            if len(self._queue) >= self.cfg.queue_size:
                oldest = self._queue.popleft()
                self.dropped += 1
                log.warning("notification queue full: dropped the oldest event",
                            dropped=oldest.kind.value, queue_size=self.cfg.queue_size)
            self._queue.append(event)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="orchestrate-notify",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is None:
            return
        thread.join(self.cfg.flush_timeout)
        if thread.is_alive():
            self._give_up.set()
            with self._cond:
                left = len(self._queue) + self._in_flight
            log.warning("notifications not sent: the release is ending", not_sent=left,
                        waited_s=self.cfg.flush_timeout)

    # ------------------------------------------------------------ sender thread

    def _senders(self) -> list[Sender]:
        senders: list[Sender] = []
        for name, target in zip(self.names, self.cfg.targets, strict=True):
            try:
                senders.append(build(name, target, self.labels))
            except OrchestrateError as exc:
                # A secret not mounted must not stop a release (nor the receiver's
                # rollback): the target is left out, loudly.
                log.error("notification target unusable, nothing will be sent to it",  # noqa: TRY400
                          target=name, error=exc.message, hint=exc.hint)
        return senders

    def _next(self) -> Event | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue or self._give_up.is_set():
                return None
            self._in_flight = 1
            return self._queue.popleft()

    def _run(self) -> None:
        senders = self._senders()
        try:
            while (event := self._next()) is not None:
                try:
                    for sender in senders:
                        if sender.target.wants(event.kind):
                            self._deliver(sender, event)
                except _GaveUp:
                    return
                finally:
                    with self._cond:
                        self._in_flight = 0
        finally:
            for sender in senders:
                sender.close()

    def _pause(self, seconds: float) -> None:
        if self._give_up.wait(seconds):
            raise _GaveUp

    def _deliver(self, sender: Sender, event: Event) -> None:
        target = sender.target
        delivery = new_delivery()
        retrying = http_retrying(f"notification {sender.name}", attempts=target.retries + 1,
                                 multiplier=target.backoff,
                                 max_wait=max(5.0, target.backoff), jitter=target.backoff,
                                 sleep=self._pause)
        started = time.monotonic()
        try:
            retrying(sender.send, event, delivery)
            self.sent += 1
        except (Undelivered, Refused) as exc:
            log.warning("notification not sent", target=sender.name, kind=event.kind.value,
                        release=event.release, error=exc.message,
                        seconds=round(time.monotonic() - started, 3))
        except _GaveUp:
            raise
        except Exception as exc:
            # The thread must outlive a surprise from a library; its text may quote a URL.
            log.warning("notification failed", target=sender.name, kind=event.kind.value,
                        error=type(exc).__name__)
        finally:
            sender.forget(delivery)
