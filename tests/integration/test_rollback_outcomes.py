"""A rollback is judged by what it leaves: the side that serves is writable by the
application role, traffic is 100 % there, no replication object is left, and no
acknowledged write is missing, whatever step of the switchover failed and whichever
process asked for it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.config import load_config
from orchestrator.errors import ReleaseFailed
from orchestrator.pg import fence, replication, sequences
from orchestrator.sandbox.loadgen import LoadGenerator, LoadReport
from orchestrator.sandbox.ports import free_port
from orchestrator.sandbox.stack import Sandbox
from orchestrator.wiring import release_for
from tests.integration import helpers as h

pytestmark = pytest.mark.slow

# Data, not metrics, is under test: no checks, short stages.
QUICK = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True, "stages": [
    {"weight": 0, "duration": "1s"}, {"weight": 100, "duration": "1s"}]}


def _blue_takes_writes_through_the_router(sb: Sandbox) -> None:
    after = LoadGenerator(sb.haproxy.url, rate=40.0, write_ratio=1.0)
    after.start()
    try:
        assert h.wait_for(lambda: after.report().acked_by_colour.get("blue", 0) >= 10,
                          timeout=20), after.report()
    finally:
        report = after.stop()
    assert report.acked_by_colour.get("green", 0) == 0
    with h.blue_conn(sb) as b:
        assert set(report.acked_order_ids) - h.order_ids(b) == set()


class _Injector:
    """Arms when blue is fenced (the switchover began), then makes ``target`` fail once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target: str, rev_subscription: str
                 ) -> None:
        self.armed = False
        self.fired = False
        real_fence = fence.fence

        def fence_then_maybe_fail(conn: psycopg.Connection[Any], role: str,
                                  **kw: Any) -> int:
            ended = real_fence(conn, role, **kw)
            first = not self.armed
            self.armed = True
            if first and target == "after-fence":
                self._fire()
            return ended

        monkeypatch.setattr(fence, "fence", fence_then_maybe_fail)
        wrapped: dict[str, tuple[Any, str, Callable[..., bool]]] = {
            "catch-up": (replication, "wait_applied",
                         lambda *a, **kw: kw.get("direction") == "fwd"),
            "sequence-move": (sequences, "sync_past", lambda *a, **kw: True),
            "reverse-start": (replication, "ensure_subscription",
                              lambda *a, **kw: a[1] == rev_subscription),
        }
        if target in wrapped:
            module, name, applies = wrapped[target]
            real = getattr(module, name)

            def maybe_fail(*args: Any, **kwargs: Any) -> Any:
                if self.armed and not self.fired and applies(*args, **kwargs):
                    self._fire()
                return real(*args, **kwargs)

            monkeypatch.setattr(module, name, maybe_fail)
        self.target = target

    def _fire(self) -> None:
        self.fired = True
        raise ReleaseFailed(f"injected failure: {self.target}")


STEPS = ["after-fence", "catch-up", "sequence-move", "reverse-start"]


@pytest.fixture
def restored(sandbox_16_17: Sandbox) -> Iterator[Sandbox]:
    h.reset(sandbox_16_17)
    yield sandbox_16_17


def _fails_at_and_leaves_blue_serving(sb: Sandbox, name: str, step: str,
                                      monkeypatch: pytest.MonkeyPatch) -> tuple[Any, LoadReport]:
    """A release under load, in this process, whose switchover fails once at
    ``step``: it must have rolled back and left what every rollback leaves."""
    for key, value in sb.secrets_env.items():
        monkeypatch.setenv(key, value)
    h.reset(sb)
    cfg = load_config(h.write_config(sb, name, canary=QUICK))
    injector = _Injector(monkeypatch, step, replication.reverse(name).subscription)
    with h.under_load(sb) as load:
        outcome = release_for(cfg).run()
    assert injector.fired, f"the switchover never reached {step}"
    assert outcome.status == "rolled_back", outcome
    h.assert_left_clean(sb, load.report())
    _blue_takes_writes_through_the_router(sb)
    return outcome, load.report()


@pytest.mark.parametrize("step", STEPS)
def test_switchover_failure_at_each_step_leaves_blue_serving_15_to_17(
        sandbox_15_17: Sandbox, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome, _ = _fails_at_and_leaves_blue_serving(sandbox_15_17, f"inject-sw-{step}", step,
                                                   monkeypatch)
    assert f"injected failure: {step}" in (outcome.error or "")


@pytest.mark.pg(">=16")
@pytest.mark.parametrize("step", STEPS)
def test_switchover_failure_at_each_step_leaves_blue_serving_bidirectional(
        sandbox_16_17: Sandbox, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, load = _fails_at_and_leaves_blue_serving(sandbox_16_17, f"inject-bi-{step}", step,
                                                monkeypatch)
    # Green took writes at 100 % before the promotion's switchover: they came back.
    assert load.acked_by_colour.get("green", 0) > 0


@pytest.mark.pg(">=16")
def test_rollback_from_another_process_while_waiting_in_the_window(restored: Sandbox) -> None:
    sb = restored
    cfg = h.write_config(sb, "window-rollback", canary=QUICK)
    log = sb.base_dir / "window-rollback.log"
    with h.release_under_load(sb, cfg, "--wait-window", log=log) as (proc, load):
        def in_window() -> bool:
            row = h.release_row(sb, "window-rollback")
            return bool(row and row["state"] == "window")

        assert h.wait_for(in_window, timeout=180), log.read_text()[-3000:]
        assert h.wait_for(lambda: load.report().acked_by_colour.get("green", 0) > 10, timeout=20)
        asked = time.time()
        back = h.run_cli(sb, "rollback", "--config", str(cfg), "--reason", "second process")
        assert back.code == 0, back.out + back.err[-3000:]
        assert "rollback requested from the running orchestrator" in back.out
        assert "ROLLED BACK" in back.out
        # The waiting process did the rollback, and says so in its exit code.
        assert proc.wait(timeout=60) == 1, log.read_text()[-3000:]
    report = load.report()
    row = h.rolled_back_row(sb, "window-rollback")
    assert "second process" in (row["error"] or "")
    with h.blue_conn(sb) as b:
        seen = b.execute("SELECT extract(epoch FROM at) FROM orchestrate.release_log "
                         "WHERE release = 'window-rollback' AND message LIKE 'rolling back%%' "
                         "ORDER BY id LIMIT 1").fetchone()
    assert seen is not None
    # Obeyed within one poll interval (1 s), plus the second process's own start-up.
    assert float(seen[0]) - asked < 5.0
    h.assert_left_clean(sb, report)


def test_rollback_of_a_finished_release_is_refused(sandbox_16_17: Sandbox) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    cfg = h.write_config(sb, "finished", canary=QUICK, rollback={"window": "0s"})
    done = h.run_cli(sb, "release", "--config", str(cfg), "--wait-window")
    assert done.code == 0, done.err[-3000:]
    row = h.release_row(sb, "finished")
    assert row is not None and row["state"] == "done"
    back = h.run_cli(sb, "rollback", "--config", str(cfg))
    assert back.code == 1
    assert "past its rollback window" in back.err and "Traceback" not in back.err
    row = h.release_row(sb, "finished")
    assert row is not None and row["state"] == "done" and row["status"] == "promoted"


def _run_with_env(sb: Sandbox, cfg: Path, **env: str) -> subprocess.CompletedProcess[str]:
    merged = {**os.environ, **sb.secrets_env, "ORCHESTRATE_LOG_FORMAT": "json", **env}
    return subprocess.run([*h.ORCHESTRATE, "release", "--config", str(cfg)], env=merged,
                          capture_output=True, text=True, timeout=120, cwd=h.REPO, check=False)


def _failed_logins(sb: Sandbox, side: str) -> int:
    cluster = sb.blue if side == "blue" else sb.green
    return cluster.log_path.read_text(errors="replace").count("password authentication failed")


@pytest.mark.parametrize("side", ["blue", "green"])
@pytest.mark.parametrize("password", ["wrong-password", ""])
def test_refused_login_exits_2_without_retrying(restored: Sandbox, side: str,
                                                password: str) -> None:
    sb = restored
    cfg = h.write_config(sb, f"login-{side}")
    before = _failed_logins(sb, side)
    done = _run_with_env(sb, cfg, **{f"ORCHESTRATE_{side.upper()}_PASSWORD": password})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "wrong-password" not in done.stderr
    assert "password" in done.stderr.lower()
    # Not retried: one refused login per connection the command needed, not five.
    assert _failed_logins(sb, side) - before <= 2
    assert h.release_row(sb, f"login-{side}") is None


def test_unreachable_blue_exits_2(restored: Sandbox) -> None:
    sb = restored
    cfg = h.write_config(sb, "blue-away", blue={"port": free_port()})
    done = _run_with_env(sb, cfg)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot connect to" in done.stderr and "Traceback" not in done.stderr
