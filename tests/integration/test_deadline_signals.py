"""Through the real CLI against the sandbox: a SIGTERM mid-canary (what a node drain
or a Job's activeDeadlineSeconds sends) leaves 100 % on blue with every acknowledged
write kept; a run outside its maintenance window changes nothing; ``--force`` runs.
A subprocess is the point here: the signal goes to the process, as the kubelet's does."""

from __future__ import annotations

import signal
import time

import pytest

from orchestrator.errors import STOPPED_EXIT
from orchestrator.routers.base import Weights
from orchestrator.sandbox.loadgen import LoadGenerator
from orchestrator.sandbox.stack import Sandbox
from tests.integration import helpers as h

pytestmark = pytest.mark.slow

LONG_STAGE = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True,
              "stages": [
    {"weight": 0, "duration": "1s"}, {"weight": 20, "duration": "10m"},
    {"weight": 100, "duration": "1s"}]}
QUICK = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True,
         "stages": [
    {"weight": 0, "duration": "1s"}, {"weight": 100, "duration": "1s"}]}
# Opens on 1 January at 00:00 for a minute: the test runs outside it.
NEVER_NOW = {"windows": [{"cron": "0 0 1 1 *", "duration": "1m", "timezone": "UTC"}]}


def test_sigterm_mid_canary_routes_everything_back_to_blue_losing_nothing(
        sandbox_16_17: Sandbox) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    cfg = h.write_config(sb, "sigterm-canary", canary=LONG_STAGE)
    log = sb.base_dir / "sigterm-canary.log"
    with h.release_under_load(sb, cfg, log=log) as (proc, load):
        assert h.wait_for(lambda: h.green_weight(sb, "sigterm-canary") == 20, timeout=180), (
            log.read_text()[-3000:])
        assert h.wait_for(lambda: load.report().acked_by_colour.get("green", 0) > 10,
                          timeout=30)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert h.wait_for(lambda: h.router(sb).current() == Weights.green_at(0), timeout=30,
                          interval=0.05)
        on_blue = time.monotonic() - sent
        code = proc.wait(timeout=120)
        exited = time.monotonic() - sent
    report = load.report()
    output = log.read_text()
    assert code == STOPPED_EXIT, output[-3000:]
    assert "SIGTERM received (canary): rolling back" in output
    row = h.rolled_back_row(sb, "sigterm-canary")
    assert "SIGTERM received" in (row["error"] or "")
    assert report.acked_by_colour.get("green", 0) > 0
    h.assert_left_clean(sb, report)  # 100 % on blue, no leftovers, 0 acked writes lost
    print(f"\nSIGTERM -> 100 % on blue: {on_blue:.2f}s; process exited after {exited:.2f}s")
    assert on_blue < 5.0


def test_a_run_outside_its_window_changes_nothing_and_force_runs(
        sandbox_16_17: Sandbox) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    cfg = h.write_config(sb, "outside-window", canary=QUICK, schedule=NEVER_NOW)
    with h.blue_conn(sb) as conn:
        slots_before = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()

    closed = h.run_cli(sb, "release", "--config", str(cfg))

    assert closed.code == 0, closed.err[-3000:]
    assert "outside every maintenance window (schedule.windows), nothing done" in closed.out
    assert "the next one opens at " in closed.out and "01-01 00:00 UTC" in closed.out
    assert h.release_row(sb, "outside-window") is None
    with h.blue_conn(sb) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (
            slots_before)
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
    assert h.router(sb).current() == Weights.green_at(0)

    forced = h.run_cli(sb, "release", "--config", str(cfg), "--force")
    assert forced.code == 0, forced.out + forced.err[-3000:]
    assert "promoted" in forced.out
    row = h.release_row(sb, "outside-window")
    assert row is not None and row["status"] == "promoted"
    h.reset(sb)


def test_outside_its_window_a_release_a_killed_run_left_on_green_is_rolled_back(
        sandbox_16_17: Sandbox) -> None:
    """The Job is killed at 20 % (OOM, node loss) and the next run comes after the
    window closed: it does not leave users split until next week, it rolls back."""
    sb = sandbox_16_17
    h.reset(sb)
    cfg = h.write_config(sb, "left-on-green", canary=LONG_STAGE, schedule=NEVER_NOW)
    log = sb.base_dir / "left-on-green.log"
    load = LoadGenerator(sb.haproxy.url, rate=60.0, write_ratio=0.5)
    load.start()
    proc = h.spawn_cli(sb, "release", "--config", str(cfg), "--force", log=log)
    try:
        assert h.wait_for(lambda: h.green_weight(sb, "left-on-green") == 20, timeout=180), (
            log.read_text()[-3000:])
        proc.kill()
        proc.wait(timeout=30)
        assert h.router(sb).current() == Weights.green_at(20)
        rerun = h.run_cli(sb, "release", "--config", str(cfg))
    finally:
        if proc.poll() is None:
            proc.kill()
        report = load.stop()
    assert rerun.code == STOPPED_EXIT, rerun.out + rerun.err[-3000:]
    assert "nothing done" not in rerun.out
    row = h.release_row(sb, "left-on-green")
    assert row is not None and row["status"] == "rolled_back"
    assert "outside every maintenance window" in (row["error"] or "")
    h.assert_left_clean(sb, report)
