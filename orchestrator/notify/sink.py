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
from dataclasses import dataclass, field

from orchestrator.config import NotificationsConfig, NotifyTarget
from orchestrator.errors import OrchestrateError
from orchestrator.events import Event
from orchestrator.logging import get_logger
from orchestrator.notify.senders import Refused, Sender, Undelivered, build, new_delivery
from orchestrator.retry import http_retrying

log = get_logger("orchestrate.notify")


class _GaveUp(Exception):
    """close() waited long enough: stop sending (not retried by any policy)."""


def _pause(give_up: threading.Event, seconds: float) -> None:
    # The backoff sleep, cut short when close() gives up.
    if give_up.wait(seconds):
        raise _GaveUp


def target_names(targets: list[NotifyTarget]) -> list[str]:
    return [t.name or f"{t.kind}-{i + 1}" for i, t in enumerate(targets)]


@dataclass
class _Batch:
    """What one sender thread works through: the events emitted between a first emit
    and ``close``. A release run twice (a rollback after a run) gets a new batch and
    a new thread; the old thread, if it is still ending, keeps to its own."""

    queue: deque[Event] = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)
    closing: bool = False
    in_flight: int = 0
    give_up: threading.Event = field(default_factory=threading.Event)


class NotificationSink:
    def __init__(self, cfg: NotificationsConfig, labels: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.labels = {**labels, **cfg.labels}
        self.names = target_names(cfg.targets)
        self._lock = threading.Lock()
        self._batch: _Batch | None = None
        self._thread: threading.Thread | None = None
        # For tests and the closing log line.
        self.sent = 0
        self.dropped = 0

    # ------------------------------------------------------------ release side

    def emit(self, event: Event) -> None:
        if not any(t.wants(event.kind) for t in self.cfg.targets):
            return
        with self._lock:
            batch = self._batch
            if batch is None:
                batch = self._batch = _Batch()
                self._thread = threading.Thread(target=self._run, args=(batch,),
                                                name="orchestrate-notify", daemon=True)
                self._thread.start()
            # Under the sink's lock too: a close() from another thread cannot detach
            # the batch between choosing it and queueing on it.
            with batch.cond:
                if len(batch.queue) >= self.cfg.queue_size:
                    oldest = batch.queue.popleft()
                    self.dropped += 1
                    log.warning("notification queue full: dropped the oldest event",
                                dropped=oldest.kind.value, queue_size=self.cfg.queue_size)
                batch.queue.append(event)
                batch.cond.notify()

    def close(self) -> None:
        with self._lock:
            batch, thread = self._batch, self._thread
            self._batch = self._thread = None
        if batch is None or thread is None:
            return
        with batch.cond:
            batch.closing = True
            batch.cond.notify()
        thread.join(self.cfg.flush_timeout)
        if thread.is_alive():
            batch.give_up.set()
            with batch.cond:
                left = len(batch.queue) + batch.in_flight
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

    @staticmethod
    def _next(batch: _Batch) -> Event | None:
        with batch.cond:
            while not batch.queue and not batch.closing:
                batch.cond.wait()
            if not batch.queue or batch.give_up.is_set():
                return None
            batch.in_flight = 1
            return batch.queue.popleft()

    def _run(self, batch: _Batch) -> None:
        senders = self._senders()
        try:
            while (event := self._next(batch)) is not None:
                try:
                    for sender in senders:
                        if sender.target.wants(event.kind):
                            self._deliver(sender, event, batch.give_up)
                except _GaveUp:
                    return
                finally:
                    with batch.cond:
                        batch.in_flight = 0
        finally:
            for sender in senders:
                sender.close()

    def _deliver(self, sender: Sender, event: Event, give_up: threading.Event) -> None:
        target = sender.target
        delivery = new_delivery()
        retrying = http_retrying(f"notification {sender.name}", attempts=target.retries + 1,
                                 multiplier=target.backoff,
                                 max_wait=max(5.0, target.backoff), jitter=target.backoff,
                                 sleep=lambda seconds: _pause(give_up, seconds))
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
