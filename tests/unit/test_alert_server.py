"""The Alertmanager receiver without a database: payload parsing, matchers, the
decisions (with a fake store) and the HTTP layer over a real socket."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from email.message import Message
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from orchestrator import logging as logs
from orchestrator.config import ReleaseConfig, parse_config
from orchestrator.errors import ConfigError
from orchestrator.record import NO_ROLLBACK_FROM
from orchestrator.server import (
    AlertReceiver,
    Matchers,
    PayloadError,
    ReceiverHTTP,
    parse_payload,
    resolve_token,
)
from orchestrator.store import ReleaseRow

TOKEN = "test-token-0123456789abcdef-0123456789"


def _config(**sections: Any) -> ReleaseConfig:
    return parse_config({
        "release": {"name": "shop-r1", "service": "shop", "namespace": "prod"},
        "blue": {"dbname": "shop", "user": "u"},
        "green": {"port": 5433, "dbname": "shop", "user": "u"},
        "router": {"kind": "fake"},
        "canary": {"checks": [], "allow_unanalysed": True},
        **sections,
    }, base_dir=Path("/tmp"))


def cfg(**alerts: Any) -> ReleaseConfig:
    return _config(alerts={"matchers": {"service": "$service", "severity": "~critical|page"},
                           **alerts})


def payload(*alerts: dict[str, Any], version: str = "4") -> bytes:
    return json.dumps({
        "version": version, "groupKey": "{}:{alertname=\"X\"}", "truncatedAlerts": 0,
        "status": "firing", "receiver": "orchestrate", "groupLabels": {},
        "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am:9093",
        "alerts": list(alerts),
    }).encode()


def alert(status: str = "firing", **labels: str) -> dict[str, Any]:
    return {"status": status,
            "labels": {"alertname": "GreenErrors", "service": "shop", "severity": "critical",
                       **labels},
            "annotations": {"summary": "green answers 5xx"},
            "startsAt": "2026-11-24T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prom/graph", "fingerprint": "abc123"}


# -- payload and matchers ------------------------------------------------------------


def test_parse_an_alertmanager_payload() -> None:
    (a,) = parse_payload(payload(alert()))
    assert a.status == "firing" and a.name == "GreenErrors"
    assert a.labels["service"] == "shop" and a.fingerprint == "abc123"
    assert a.describe() == "alert GreenErrors firing: green answers 5xx"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (payload(alert(), version="3"), "version '3'"),
        (json.dumps({"version": "4", "alerts": {}}).encode(), "'alerts' must be a list"),
        (json.dumps({"version": "4", "alerts": [{"status": "odd"}]}).encode(), "status"),
        (json.dumps({"version": "4", "alerts": [{"status": "firing", "labels": []}]}).encode(),
         "labels must be an object"),
    ],
)
def test_bad_payloads_are_refused(body: bytes, problem: str) -> None:
    with pytest.raises(PayloadError) as err:
        parse_payload(body)
    assert problem in str(err.value)


def test_matchers() -> None:
    m = Matchers({"service": "$service", "severity": "~critical|page", "env": "!staging",
                  "team": "!~ops.*"}, {"service": "shop"})
    base = {"service": "shop", "severity": "page", "env": "prod", "team": "payments"}
    assert m.match(base)
    assert not m.match({**base, "service": "shopping"})
    # A regex must match the whole value, as in Alertmanager.
    assert not m.match({**base, "severity": "critical-ish"})
    assert not m.match({**base, "env": "staging"})
    assert not m.match({**base, "team": "ops-db"})
    # A missing label reads as "": it fails an equality, passes a negation.
    assert not m.match({k: v for k, v in base.items() if k != "service"})
    assert m.match({k: v for k, v in base.items() if k != "env"})
    assert "service: 'shop'" in m.describe()


# -- decisions ------------------------------------------------------------------------


class FakeStore:
    def __init__(self, row: ReleaseRow | None) -> None:
        self.row = row
        self.requests: list[str] = []
        self.logs: list[str] = []
        self.down = 0
        self.closed = 0

    def get(self, name: str) -> ReleaseRow | None:
        if self.down:
            self.down -= 1
            raise psycopg.OperationalError("connection refused")
        return self.row

    def request_rollback(self, name: str, reason: str) -> bool:
        assert self.row is not None
        # As StateStore.request_rollback: any state a rollback can start from.
        if self.row.state in NO_ROLLBACK_FROM or self.row.rollback_requested:
            return False
        self.row.rollback_requested = reason
        self.requests.append(reason)
        return True

    def log(self, name: str, level: str, message: str, *, state: str | None = None,
            details: dict[str, Any] | None = None, duration_s: float | None = None) -> None:
        self.logs.append(message)

    def close(self) -> None:
        self.closed += 1


def running(state: str = "canary", status: str = "running",
            promoted_at: float | None = None) -> ReleaseRow:
    row = ReleaseRow(name="shop-r1", state=state, status=status, config_sha256="x")
    if promoted_at is not None:
        row.facts = row.facts.model_copy(update={"promoted_at": promoted_at})
    return row


class Harness:
    def __init__(self, row: ReleaseRow | None, *, lock_free: bool = False,
                 rollback_blocks: bool = False, config: ReleaseConfig | None = None,
                 follow: Any = None) -> None:
        self.store = FakeStore(row)
        self.lock_free = lock_free
        self.rollbacks: list[str] = []
        self.rolled: list[str] = []
        self.release = threading.Event()
        if not rollback_blocks:
            self.release.set()
        self.receiver_cfg = config or cfg()
        self.receiver = AlertReceiver(self.receiver_cfg, store=self.store, token=TOKEN,
                                      lock_is_free=lambda: self.lock_free,
                                      run_rollback=self._rollback, follow=follow)

    def _rollback(self, reason: str) -> None:
        self.rollbacks.append(reason)
        self.release.wait(5)
        # The release this rollback works on, read as the real runner reads it.
        self.rolled.append(self.receiver.cfg.release.name)

    def send(self, *alerts: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        decision = self.receiver.handle(parse_payload(payload(*alerts)))
        return decision.code, decision.body


def test_firing_matching_alert_asks_the_running_orchestrator() -> None:
    h = Harness(running())
    code, body = h.send(alert())
    assert code == 202 and body["action"] == "rollback_requested"
    assert body["executor"] == "orchestrator"
    assert h.store.requests == ["alert GreenErrors firing: green answers 5xx"]
    assert h.store.logs and "requested by Alertmanager" in h.store.logs[0]
    assert h.rollbacks == []


def test_a_repeated_alert_queues_nothing_new() -> None:
    h = Harness(running())
    h.send(alert())
    code, body = h.send(alert())
    assert code == 200 and body["action"] == "none"
    assert "already requested" in body["reason"]
    assert len(h.store.requests) == 1 and h.rollbacks == []


def test_a_release_already_rolling_back_is_left_alone() -> None:
    h = Harness(running(state="rollback"))
    code, body = h.send(alert())
    assert code == 200 and body["action"] == "none" and h.store.requests == []


@pytest.mark.parametrize(
    ("alerts", "reason"),
    [
        ([alert(status="resolved")], "no alert is firing"),
        ([alert(service="billing")], "no firing alert matches"),
        ([alert(severity="warning")], "no firing alert matches"),
        ([], "no alert is firing"),
    ],
)
def test_resolved_and_unmatched_alerts_are_ignored(alerts: list[dict[str, Any]],
                                                   reason: str) -> None:
    h = Harness(running())
    code, body = h.send(*alerts)
    assert code == 200 and body["action"] == "ignored" and reason in body["reason"]
    assert h.store.requests == []


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (None, "has not started"),
        (running(state="rolled_back", status="rolled_back"), "is rolled_back"),
        (running(state="cleanup", status="promoted"), "is promoted (state cleanup)"),
        (running(state="window", status="promoted", promoted_at=time.time() - 7200),
         "its rollback window closed at"),
    ],
)
def test_a_release_that_is_not_running_is_never_rolled_back(row: ReleaseRow | None,
                                                           reason: str) -> None:
    h = Harness(row, lock_free=True)
    code, body = h.send(alert())
    assert code == 200 and body["action"] == "ignored" and reason in body["reason"]
    assert h.store.requests == [] and h.rollbacks == []


def test_an_alert_in_the_rollback_window_rolls_a_promoted_release_back() -> None:
    # Promoted a minute ago, the window (an hour by default) is open: this is exactly
    # when a regression shows, so the alert is obeyed, not "ignored: promoted".
    h = Harness(running(state="window", status="promoted", promoted_at=time.time() - 60),
                lock_free=True, rollback_blocks=True)
    code, body = h.send(alert())
    h.release.set()
    h.receiver.wait(5)
    assert code == 202 and body["action"] == "rollback_requested"
    assert body["state"] == "window" and body["executor"] == "receiver"
    assert h.store.requests == ["alert GreenErrors firing: green answers 5xx"]
    assert h.rollbacks == ["alert GreenErrors firing: green answers 5xx"]


def test_a_receiver_without_a_release_name_follows_the_release_of_the_day() -> None:
    # serve started while shop-r1 ran; the CronJob's next run is shop-r2. An alert
    # naming shop-r2 is about the release now running, not "another release".
    first = cfg()
    second = first.model_copy(update={"release": first.release.model_copy(
        update={"name": "shop-r2"})})
    current = [first]
    h = Harness(running(), follow=lambda store: current[0])
    code, body = h.send(alert(release="shop-r2"))
    assert code == 200 and body["action"] == "ignored" and "shop-r2" in body["reason"]
    current[0] = second
    code, body = h.send(alert(release="shop-r2"))
    assert code == 202 and body["release"] == "shop-r2", body
    assert h.receiver.name == "shop-r2" and h.receiver.cfg is second
    # The state database down while following: 503, Alertmanager retries.
    h.store.row = None
    h2 = Harness(running(), follow=lambda store: store.get("x") or current[0])
    h2.store.down = 2
    code, body = h2.send(alert())
    assert code == 503 and "unreachable" in body["error"]


def test_a_rollback_works_on_the_release_it_was_decided_for() -> None:
    # The receiver's own rollback of shop-r1 is under way when the next release
    # starts and an alert makes the receiver follow it: the rollback stays on shop-r1.
    first = cfg()
    second = first.model_copy(update={"release": first.release.model_copy(
        update={"name": "shop-r2"})})
    current = [first]
    h = Harness(running(), lock_free=True, rollback_blocks=True,
                follow=lambda store: current[0])
    code, _ = h.send(alert())
    assert code == 202
    current[0] = second
    code, body = h.send(alert(release="shop-r2"))
    assert body["release"] == "shop-r2" and h.receiver.name == "shop-r2"
    h.release.set()
    h.receiver.wait(5)
    assert h.rolled == ["shop-r1"]


def test_without_an_orchestrator_the_receiver_rolls_back_itself_once() -> None:
    h = Harness(running(), lock_free=True, rollback_blocks=True)
    code, body = h.send(alert())
    assert code == 202 and body["executor"] == "receiver"
    # The same alert again while that rollback runs: nothing new, no second worker.
    code, body = h.send(alert())
    assert code == 200 and body["executor"] == "receiver"
    h.release.set()
    h.receiver.wait(5)
    assert h.rollbacks == ["alert GreenErrors firing: green answers 5xx"]


def test_a_requested_rollback_nobody_performs_is_started_by_the_next_alert() -> None:
    row = running()
    row.rollback_requested = "operator asked"
    h = Harness(row, lock_free=True)
    code, body = h.send(alert())
    h.receiver.wait(5)
    assert code == 202 and body["action"] == "rollback_started"
    assert h.rollbacks == ["operator asked"] and h.store.requests == []


def test_a_release_that_moved_past_its_window_meanwhile_is_ignored() -> None:
    # Read in the window, in cleanup by the time the request is written: the write
    # matches nothing and the row, read again, says why (not "already requested").
    h = Harness(running(state="window"), lock_free=True)

    def moved_on(name: str, reason: str) -> bool:
        h.store.row = running(state="cleanup", status="promoted")
        return False
    h.store.request_rollback = moved_on  # type: ignore[method-assign]
    code, body = h.send(alert())
    assert code == 200 and body["action"] == "ignored"
    assert "cannot be rolled back: it is cleanup" in body["reason"]
    assert h.rollbacks == []


def test_state_database_down_answers_503_so_alertmanager_retries() -> None:
    h = Harness(running())
    h.store.down = 2
    code, body = h.send(alert())
    assert code == 503 and "unreachable" in body["error"]
    # One broken connection is reopened transparently.
    h.store.down = 1
    code, _ = h.send(alert())
    assert code == 202 and h.store.closed == 3


def default_cfg() -> ReleaseConfig:
    """No alerts.matchers: the documented narrow default."""
    return _config()


def default_harness(row: ReleaseRow | None) -> Harness:
    h = Harness(row)
    h.receiver = AlertReceiver(default_cfg(), store=h.store, token=TOKEN,
                               lock_is_free=lambda: False, run_rollback=h.rollbacks.append)
    return h


def test_default_matchers_require_the_alert_to_name_this_release() -> None:
    # On main the default {service: $service} rolled back on any firing alert of the
    # service: a blue-only alert, another team's release...
    h = default_harness(running())
    code, body = h.send(alert())  # service=shop, but no release label
    assert code == 200 and body["action"] == "ignored"
    assert "no release='shop-r1' label" in body["reason"], body
    assert h.store.requests == []
    code, body = h.send(alert(release="shop-r1"))
    assert code == 202 and body["action"] == "rollback_requested"


@pytest.mark.parametrize("make", [default_harness, Harness])
def test_an_alert_naming_another_release_never_matches(make: Any) -> None:
    # Whatever the matchers say (the configured ones match service/severity here).
    h = make(running())
    code, body = h.send(alert(release="shop-r0"))
    assert code == 200 and body["action"] == "ignored"
    assert "names release 'shop-r0'" in body["reason"]
    assert h.store.requests == []


def started(at: str) -> ReleaseRow:
    row = running()
    row.started_at = datetime.fromisoformat(at)
    return row


def test_an_alert_older_than_the_release_is_ignored_with_a_reason() -> None:
    h = default_harness(started("2026-11-24T10:05:00+00:00"))
    old = {**alert(release="shop-r1"), "startsAt": "2026-11-24T10:00:00.123456789Z"}
    code, body = h.send(old)
    assert code == 200 and body["action"] == "ignored"
    assert "before release shop-r1 started" in body["reason"]
    assert "about the version before this release" in body["reason"]
    assert h.store.requests == []
    # A group with an old and a new alert: the new one acts.
    new = {**alert(release="shop-r1"), "startsAt": "2026-11-24T10:06:00Z"}
    code, body = h.send(old, new)
    assert code == 202 and body["matching_alerts"] == 1


def test_an_alert_resent_every_repeat_interval_requests_once() -> None:
    h = default_harness(started("2026-11-24T09:00:00+00:00"))
    codes = [h.send(alert(release="shop-r1"))[0] for _ in range(5)]
    assert codes == [202, 200, 200, 200, 200]
    assert len(h.store.requests) == 1 and len(h.store.logs) == 1


def test_a_bad_starts_at_is_a_bad_payload() -> None:
    with pytest.raises(PayloadError) as err:
        parse_payload(payload({**alert(), "startsAt": "yesterday"}))
    assert "startsAt" in str(err.value)


def test_matchers_are_parsed_in_one_place() -> None:
    with pytest.raises(ConfigError) as err:
        cfg(matchers={"severity": "!~(critical"})
    assert "not a valid regular expression" in err.value.message


class BlockingStore(FakeStore):
    def __init__(self, row: ReleaseRow | None) -> None:
        super().__init__(row)
        self.unblock = threading.Event()

    def get(self, name: str) -> ReleaseRow | None:
        self.unblock.wait(10)
        return super().get(name)


def test_alerts_do_not_queue_forever_behind_one_stuck_call() -> None:
    h = Harness(running())
    h.store = BlockingStore(running())
    h.receiver = AlertReceiver(cfg(state_timeout="1s"), store=h.store, token=TOKEN,
                               lock_is_free=lambda: False, run_rollback=h.rollbacks.append)
    first = threading.Thread(target=h.send, args=(alert(),), daemon=True)
    first.start()
    time.sleep(0.1)
    began = time.monotonic()
    code, body = h.send(alert())
    waited = time.monotonic() - began
    h.store.unblock.set()
    first.join(5)
    assert code == 503 and "busy" in body["error"], body
    assert waited < 2.0


# -- HTTP --------------------------------------------------------------------------------


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Harness]]:
    h = Harness(running())
    server = ReceiverHTTP(h.receiver, h.receiver_cfg.alerts, host="127.0.0.1", port=0).start()
    yield server.url, h
    server.stop()


def call(url: str, body: bytes | None = None, token: str | None = TOKEN,
         headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers=headers or {})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            # A Message: header names are case-insensitive (h11 sends them lower-case).
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_http_token_is_required_and_compared(http_receiver: tuple[str, Harness],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(fmt="json")
    try:
        _token_checks(http_receiver, capsys)
    finally:
        # The logger holds capsys's stream, which closes after this test.
        structlog.reset_defaults()


def _token_checks(http_receiver: tuple[str, Harness],
                  capsys: pytest.CaptureFixture[str]) -> None:
    url, h = http_receiver
    code, headers, _ = call(f"{url}/alertmanager", payload(alert()), token=None)
    assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    code, _, _ = call(f"{url}/alertmanager", payload(alert()), token="wrong-" + TOKEN)
    assert code == 401
    code, _, _ = call(f"{url}/alertmanager", payload(alert()), token=None,
                      headers={"Authorization": f"Basic {TOKEN}"})
    assert code == 401
    assert h.store.requests == []
    code, _, raw = call(f"{url}/alertmanager", payload(alert()))
    assert code == 202 and json.loads(raw)["action"] == "rollback_requested"
    time.sleep(0.1)
    err = capsys.readouterr().err
    assert TOKEN not in err
    # Verbatim: on main the scrubber turned it into "missing or wrong bearer ***".
    assert '"alert refused: missing or wrong bearer token"' in err


def test_http_health_metrics_and_errors(http_receiver: tuple[str, Harness]) -> None:
    url, _ = http_receiver
    code, _, raw = call(f"{url}/healthz", token=None)
    assert code == 200 and json.loads(raw)["release"] == "shop-r1"
    assert call(f"{url}/alertmanager", b"{oops")[0] == 400
    assert call(f"{url}/elsewhere", payload(alert()))[0] == 404
    code, _, raw = call(f"{url}/alertmanager", payload(alert(status="resolved")))
    assert code == 200 and json.loads(raw)["action"] == "ignored"
    code, _, raw = call(f"{url}/metrics", token=None)
    text = raw.decode()
    assert code == 200
    assert 'orchestrate_alert_requests_total{release="shop-r1",outcome="bad_payload"} 1' in text
    assert 'outcome="ignored"} 1' in text


def test_http_body_size_is_bounded(http_receiver: tuple[str, Harness]) -> None:
    url, _ = http_receiver
    host, port = url.removeprefix("http://").split(":")
    import http.client

    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.putrequest("POST", "/alertmanager")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


# -- starting -------------------------------------------------------------------------------


def test_no_token_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCHESTRATE_WEBHOOK_TOKEN", raising=False)
    with pytest.raises(ConfigError) as err:
        resolve_token(cfg().alerts, host="127.0.0.1", insecure=False)
    assert "ORCHESTRATE_WEBHOOK_TOKEN" in err.value.message and err.value.hint
    assert "--insecure" in err.value.hint


def test_insecure_only_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCHESTRATE_WEBHOOK_TOKEN", raising=False)
    assert resolve_token(cfg().alerts, host="127.0.0.1", insecure=True) is None
    assert resolve_token(cfg().alerts, host="::1", insecure=True) is None
    with pytest.raises(ConfigError) as err:
        resolve_token(cfg().alerts, host="0.0.0.0", insecure=True)
    assert "loopback" in err.value.message


def test_token_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    assert resolve_token(cfg(token={"file": str(secret)}).alerts, host="0.0.0.0",
                         insecure=False) == TOKEN
    secret.write_text("\n")
    with pytest.raises(ConfigError) as err:
        resolve_token(cfg(token={"file": str(secret)}).alerts, host="0.0.0.0", insecure=False)
    assert "empty" in err.value.message
