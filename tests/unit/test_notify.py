"""Notifications against a real local HTTP receiver: every event kind, the HMAC
signature, Slack's body, filters, apprise, retries, and receivers that are dead or
slow (the release's side never waits for them)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestrator.config import NotificationsConfig, parse_config
from orchestrator.errors import ConfigError
from orchestrator.events import Event, Events, Kind, RecordingSink
from orchestrator.notify import NotificationSink, attach_notifications, verify
from orchestrator.notify.messages import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from tests.notify_receiver import Receiver, closed_port, receiver
from tests.unit.test_config import minimal

SECRET_ENV = "ORCH_TEST_NOTIFY_SECRET"
SECRET = "s3cret-for-the-webhook-signature"
LABELS = {"service": "shop", "namespace": "prod", "version": "v2"}


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with receiver() as made:
        yield made


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def sink(*targets: dict[str, Any], **section: Any) -> NotificationSink:
    cfg = NotificationsConfig.model_validate({"targets": list(targets), **section})
    return NotificationSink(cfg, LABELS)


def event(kind: Kind, **fields: Any) -> Event:
    return Event(kind, "shop-v2", **fields)


def every_kind() -> list[Event]:
    return [event(k, state="canary", stage=2, stages=4, weight=20,
                  reason="error rate 0.2 over 0.05" if "back" in k or k == Kind.FAILED
                  else None) for k in Kind]


def test_each_event_kind_reaches_the_webhook_signed(rx: Receiver) -> None:
    s = sink({"kind": "webhook", "name": "ops", "url": rx.url(), "secret": {"env": SECRET_ENV},
              "events": [k.value for k in Kind], "labels": {"team": "payments"}},
             labels={"env": "prod"})
    for e in every_kind():
        s.emit(e)
    s.close()

    got = rx.wait_for(len(Kind))
    assert [r.json()["event"] for r in got] == [k.value for k in Kind]
    for r, sent in zip(got, every_kind(), strict=True):
        body = r.json()
        # The event as the machine emitted it, plus a line for people and the labels.
        assert {k: body[k] for k in sent.as_dict() if k != "at"} == {
            k: v for k, v in sent.as_dict().items() if k != "at"}
        assert body["text"].startswith("orchestrate shop-v2: ")
        assert body["labels"] == {**LABELS, "env": "prod", "team": "payments"}
        assert r.headers["X-Orchestrate-Event"] == sent.kind.value
        assert r.headers[SIGNATURE_HEADER].startswith("sha256=")
        assert verify(SECRET, r.body, r.headers)
        assert not verify("another-secret", r.body, r.headers)
        assert not verify(SECRET, r.body + b" ", r.headers)  # the exact bytes are signed
        stale = {**r.headers, TIMESTAMP_HEADER: str(int(r.headers[TIMESTAMP_HEADER]) - 3600)}
        assert not verify(SECRET, r.body, stale)  # the timestamp is inside the signature
    rolled = next(r.json() for r in got if r.json()["event"] == "rolled_back")
    assert rolled["reason"] == "error rate 0.2 over 0.05"
    assert rolled["text"] == ("orchestrate shop-v2: rolled back, all traffic on blue: "
                              "error rate 0.2 over 0.05")
    assert s.sent == len(Kind)


def test_a_webhook_without_a_secret_is_sent_unsigned(rx: Receiver) -> None:
    s = sink({"kind": "webhook", "url": rx.url()})
    s.emit(event(Kind.PROMOTED))
    s.close()
    (r,) = rx.wait_for(1)
    assert SIGNATURE_HEADER not in r.headers and r.json()["event"] == "promoted"


def test_slack_gets_a_short_readable_text(rx: Receiver) -> None:
    s = sink({"kind": "slack", "url": rx.url("/services/T0/B0/x")})
    s.emit(event(Kind.STAGE_PASSED, state="canary", stage=2, stages=4, weight=20))
    s.emit(event(Kind.ROLLED_BACK, state="rolled_back", reason="p99 latency 2.1s over 0.5s"))
    s.emit(event(Kind.AWAITING_APPROVAL, state="canary", stage=3, stages=4,
                 details={"awaiting": "stage 3"}))
    s.emit(event(Kind.AWAITING_APPROVAL, state="canary", stages=4,
                 details={"awaiting": "the promotion"}))
    s.close()
    bodies = [r.json() for r in rx.wait_for(4)]
    assert all(set(b) == {"text"} for b in bodies)
    assert [b["text"] for b in bodies] == [
        "orchestrate shop-v2: stage 2/4 passed, 20% of traffic on green",
        "orchestrate shop-v2: rolled back, all traffic on blue: p99 latency 2.1s over 0.5s",
        "orchestrate shop-v2: waiting for approval of stage 3/4 "
        "(`orchestrate promote --release shop-v2`)",
        "orchestrate shop-v2: waiting for approval of the promotion "
        "(`orchestrate promote --release shop-v2`)"]
    assert rx.requests[0].path == "/services/T0/B0/x"


def test_events_are_filtered_per_target(rx: Receiver) -> None:
    s = sink({"kind": "webhook", "name": "milestones", "url": rx.url("/default")},
             {"kind": "webhook", "name": "only-failures", "url": rx.url("/failures"),
              "events": ["failed", "rolled_back"]},
             {"kind": "webhook", "name": "chatty", "url": rx.url("/chatty"),
              "events": ["state", "measurement"]})
    for kind in (Kind.STARTED, Kind.STATE, Kind.MEASUREMENT, Kind.STATE_DONE,
                 Kind.ROLLED_BACK, Kind.DONE):
        s.emit(event(kind, state="sync", details={"check": "errors", "value": 0.1}))
    s.close()
    rx.wait_for(6)
    by_path: dict[str, list[str]] = {}
    for r in rx.requests:
        by_path.setdefault(r.path, []).append(r.json()["event"])
    # The default is the milestones: never `state`, `state_done` or `measurement`.
    assert by_path == {"/default": ["started", "rolled_back", "done"],
                       "/failures": ["rolled_back"],
                       "/chatty": ["state", "measurement"]}


def test_apprise_sends_to_each_of_its_urls(rx: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_TEST_APPRISE_URL", f"json://127.0.0.1:{rx.port}/second")
    s = sink({"kind": "apprise", "name": "chat",
              "urls": [f"json://127.0.0.1:{rx.port}/first", {"env": "ORCH_TEST_APPRISE_URL"}]})
    s.emit(event(Kind.FAILED, state="sync", reason="slot lost"))
    s.close()
    got = rx.wait_for(2)
    assert sorted(r.path for r in got) == ["/first", "/second"]
    body = got[0].json()
    assert body["title"] == "orchestrate shop-v2: failed"
    assert body["message"] == ("orchestrate shop-v2: FAILED in sync, waiting for a person: "
                               "slot lost")
    assert body["type"] == "failure"


def test_an_answer_that_says_try_again_is_retried_with_one_delivery_id() -> None:
    with receiver(statuses=[503, 429]) as rx:
        s = sink({"kind": "webhook", "url": rx.url(), "secret": {"env": SECRET_ENV},
                  "backoff": "50ms"})
        s.emit(event(Kind.PROMOTED))
        s.close()
        got = rx.wait_for(3)
    assert len({r.headers[DELIVERY_HEADER] for r in got}) == 1
    assert all(verify(SECRET, r.body, r.headers) for r in got)
    assert s.sent == 1


def test_a_refusal_is_not_retried_and_is_logged_by_name() -> None:
    with receiver(statuses=[401]) as rx, capture_logs() as logs:
        s = sink({"kind": "webhook", "name": "audit", "url": rx.url()})
        s.emit(event(Kind.PROMOTED))
        s.close()
        rx.wait_for(1)
        time.sleep(0.2)
        assert len(rx.requests) == 1
    (line,) = [e for e in logs if e["event"] == "notification not sent"]
    assert (line["target"], line["error"], line["kind"]) == ("audit", "HTTP 401", "promoted")


TOKEN = "T0KEN-0123456789abcdef"


def _no_url_in(logs: list[dict[str, Any]], port: int) -> None:
    text = repr(logs)
    assert TOKEN not in text and f":{port}" not in text, text


def test_a_dead_receiver_costs_the_release_nothing_and_is_named_not_quoted() -> None:
    port = closed_port()
    with capture_logs() as logs:
        s = sink({"kind": "slack", "name": "chat-ops",
                  "url": f"http://127.0.0.1:{port}/services/{TOKEN}", "retries": 2,
                  "backoff": "50ms"},
                 flush_timeout="5s")
        for kind in (Kind.STARTED, Kind.STAGE_PASSED, Kind.PROMOTED):
            started = time.monotonic()
            s.emit(event(kind))
            assert time.monotonic() - started < 0.05
        s.close()
    failed = [e for e in logs if e["event"] == "notification not sent"]
    assert [e["kind"] for e in failed] == ["started", "stage_passed", "promoted"]
    assert {e["target"] for e in failed} == {"chat-ops"}
    assert all(e["error"] == "cannot reach it (ConnectionError)" for e in failed)
    retried = [e for e in logs if e["event"] == "call failed, retrying"]
    assert len(retried) == 2 * 3 and {e["call"] for e in retried} == {"notification chat-ops"}
    _no_url_in(logs, port)


def test_a_slow_receiver_is_given_up_on_at_close() -> None:
    with receiver(delay=30) as rx, capture_logs() as logs:
        s = sink({"kind": "webhook", "name": "slowpoke", "url": rx.url(f"/{TOKEN}"),
                  "timeout": "300ms", "retries": 5, "backoff": "50ms"}, flush_timeout="1s")
        for _ in range(3):
            started = time.monotonic()
            s.emit(event(Kind.STAGE_PASSED, stage=1, stages=2))
            assert time.monotonic() - started < 0.05
        started = time.monotonic()
        s.close()
        waited = time.monotonic() - started
        # flush_timeout, not the 3 events x 6 attempts x 300 ms the retries would take.
        assert 0.9 < waited < 2.0
        given_up = [e for e in logs if e["event"] == "notifications not sent: the release "
                    "is ending"]
        assert len(given_up) == 1 and given_up[0]["not_sent"] == 3
        # The thread stops at once: no further attempt after close() gave up.
        count = len(rx.requests)
        time.sleep(0.8)
        assert len(rx.requests) == count
    timeouts = [e for e in logs if e["event"] == "call failed, retrying"]
    assert timeouts and all(e["error"] == "no answer within 0.3s" for e in timeouts)
    _no_url_in(logs, rx.port)


def test_a_full_queue_drops_the_oldest_without_blocking() -> None:
    with receiver(delay=30) as rx, capture_logs() as logs:
        s = sink({"kind": "webhook", "url": rx.url(), "timeout": "5s", "retries": 0},
                 queue_size=2, flush_timeout="100ms")
        s.emit(event(Kind.STARTED))
        rx.wait_for(1)  # the thread is busy with it: the next ones queue up
        started = time.monotonic()
        for stage in range(1, 6):
            s.emit(event(Kind.STAGE_PASSED, stage=stage, stages=5))
        assert time.monotonic() - started < 0.05
        s.close()
    assert s.dropped == 3
    dropped = [e for e in logs if e["event"] == "notification queue full: dropped the "
               "oldest event"]
    assert len(dropped) == 3 and dropped[0]["queue_size"] == 2


def test_an_unusable_target_is_left_out_and_the_others_still_hear(
        rx: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV)
    with capture_logs() as logs:
        s = sink({"kind": "webhook", "name": "signed", "url": rx.url("/signed"),
                  "secret": {"env": SECRET_ENV}},
                 {"kind": "apprise", "name": "nonsense", "urls": ["nosuchscheme://x"]},
                 {"kind": "slack", "name": "chat", "url": rx.url("/chat")})
        s.emit(event(Kind.PROMOTED))
        s.close()
    assert [r.path for r in rx.wait_for(1)] == ["/chat"]
    unusable = {e["target"]: e["error"] for e in logs
                if e["event"].startswith("notification target unusable")}
    assert unusable == {"signed": f"the environment variable {SECRET_ENV} is not set",
                        "nonsense": "urls[0] is not an apprise URL apprise can use"}


def test_attach_adds_a_sink_only_when_targets_are_configured(tmp_path: Path) -> None:
    plain = parse_config(minimal(), base_dir=tmp_path)
    assert attach_notifications(plain).sinks == []
    cfg = parse_config(minimal(notifications={"targets": [
        {"kind": "slack", "url": {"env": "SLACK_URL"}}]}), base_dir=tmp_path)
    mine = Events()
    assert attach_notifications(cfg, mine) is mine
    (made,) = mine.sinks
    assert isinstance(made, NotificationSink) and made.names == ["slack-1"]
    made.close()  # never started: returns at once


@pytest.mark.parametrize(
    ("target", "field", "says"),
    [
        ({"kind": "teams", "url": "https://x"}, "notifications.targets[0].kind",
         "'webhook', 'slack' or 'apprise'"),
        ({"kind": "webhook"}, "notifications.targets[0]", "url: a webhook target needs a url"),
        ({"kind": "slack", "url": "ftp://x"}, "notifications.targets[0]",
         "url: not an http:// or https:// URL"),
        ({"kind": "apprise", "url": "json://x"}, "notifications.targets[0]",
         "url: an apprise target takes `urls`"),
        ({"kind": "webhook", "url": "https://x", "secret": "hunter2"},
         "notifications.targets[0].secret", "given by reference, never by value"),
        ({"kind": "webhook", "url": "https://x", "secret": {"env": "A", "file": "/b"}},
         "notifications.targets[0].secret", "exactly one of 'env'"),
        ({"kind": "slack", "url": "https://x", "secret": {"env": "A"}},
         "notifications.targets[0]", "secret: only a webhook target signs"),
        ({"kind": "slack", "url": {"env": "A", "value": "https://x"}},
         "notifications.targets[0].url", "exactly one of them"),
        ({"kind": "slack", "url": "https://x", "events": ["promoted", "exploded"]},
         "notifications.targets[0].events[1]", "'started'"),
        ({"kind": "slack", "url": "https://x", "timeout": 0},
         "notifications.targets[0].timeout", "more than 0s"),
        ({"kind": "slack", "url": "https://x", "tiemout": 1},
         "notifications.targets[0].tiemout", "Extra inputs are not permitted"),
    ],
)
def test_bad_notification_config_names_the_field(
        tmp_path: Path, target: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(notifications={"targets": [target]}), base_dir=tmp_path)
    assert f"invalid configuration: {field}: " in err.value.message
    assert says in err.value.message


def test_two_targets_with_one_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the name 'ops' is used twice"):
        parse_config(minimal(notifications={"targets": [
            {"kind": "slack", "name": "ops", "url": "https://a"},
            {"kind": "webhook", "name": "ops", "url": "https://b"}]}), base_dir=tmp_path)


def test_a_sink_closed_once_still_sends_what_a_second_run_emits(rx: Receiver) -> None:
    # A Release run twice (the CLI's rollback after a first run) shares its sink.
    s = sink({"kind": "webhook", "url": rx.url()})
    s.emit(event(Kind.STARTED))
    s.close()
    s.emit(event(Kind.ROLLED_BACK, reason="asked for"))
    s.close()
    assert [r.json()["event"] for r in rx.wait_for(2)] == ["started", "rolled_back"]


def test_release_for_wires_the_notifications(tmp_path: Path) -> None:
    # The CLI's release and the receiver's background rollback both build here.
    from orchestrator.wiring import release_for

    cfg = parse_config(minimal(notifications={"targets": [
        {"kind": "slack", "name": "chat", "url": "https://hooks.example/x"}]}),
        base_dir=tmp_path)
    mine = RecordingSink()
    release = release_for(cfg, events=Events([mine]))
    sinks = release.ctx.events.sinks
    assert sinks[0] is mine and isinstance(sinks[1], NotificationSink)
    assert sinks[1].names == ["chat"]
    # Without targets no notification sink (the metrics one is always there).
    assert not any(isinstance(s, NotificationSink) for s in release_for(
        parse_config(minimal(), base_dir=tmp_path)).ctx.events.sinks)
