"""A server that stops answering without closing its connections (every process of
the cluster SIGSTOPped, as a paused VM is): no hang, no lost write, and a rollback
that finishes once the server answers again. Each freeze outlasts
``wal_receiver_timeout`` (lowered to 5 s here, so the tests take seconds, not
minutes), which is what used to disable the subscriptions for good."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from orchestrator.pg.initial_copy import COPY_APP_PREFIX
from orchestrator.routers.base import Weights
from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.sandbox.ports import free_port
from orchestrator.sandbox.stack import Sandbox
from tests.faults.freeze import frozen
from tests.faults.netns import IsolatedAddress
from tests.faults.proxy import Proxy
from tests.integration import helpers as h

pytestmark = pytest.mark.slow

RECEIVER_TIMEOUT_S = 5
FREEZE_S = 3 * RECEIVER_TIMEOUT_S
# Probes every second, 2 s each, 2 failures: a frozen side fails the stage in ~6 s.
PROBE = {"timeout": "2s", "failure_limit": 2}


def _set_timeouts(cluster: PgCluster, seconds: int | None) -> None:
    for name in ("wal_receiver_timeout", "wal_sender_timeout"):
        if seconds is None:
            cluster.execute(f"ALTER SYSTEM RESET {name}")
        else:
            cluster.execute(f"ALTER SYSTEM SET {name} = '{seconds}s'")
    cluster.execute("SELECT pg_reload_conf()")


@pytest.fixture
def short_timeouts(sandbox_16_17: Sandbox) -> Iterator[Sandbox]:
    sb = sandbox_16_17
    h.reset(sb)
    for cluster in (sb.blue, sb.green):
        _set_timeouts(cluster, RECEIVER_TIMEOUT_S)
    try:
        yield sb
    finally:
        for cluster in (sb.blue, sb.green):
            _set_timeouts(cluster, None)


@pytest.mark.parametrize("fault", ["freeze", "rollback-requested", "blackhole"])
def test_green_frozen_during_a_stage_fails_it_and_the_rollback_finishes_after(
        short_timeouts: Sandbox, fault: str) -> None:
    """The probe fails the stage. ``rollback-requested``: an operator's `orchestrate
    rollback` from a second process during the freeze is seen and the waiting CLI
    reports the running orchestrator's outcome instead of waiting silently.
    ``blackhole``: green keeps running, but the path to it (the orchestrator's and
    blue's reverse subscription's) drops every packet, as a lost network does."""
    sb = short_timeouts
    requested = fault == "rollback-requested"
    stages = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True,
        "probe": PROBE, "stages": [
        {"weight": 0, "duration": "1s"}, {"weight": 20, "duration": "120s"},
        {"weight": 100, "duration": "1s"}]}
    name = f"green-{fault}"
    with contextlib.ExitStack() as stack:
        if fault == "blackhole":
            path = stack.enter_context(IsolatedAddress((sb.green.host, sb.green.port)))
            cfg = h.write_config(sb, name, canary=stages,
                                 green={"host": path.host, "port": path.port})
            stop_answering: Callable[[], contextlib.AbstractContextManager[Any]] = \
                path.blackholed
        else:
            cfg = h.write_config(sb, name, canary=stages)
            stop_answering = partial(frozen, sb.green)
        _green_stops_answering_in_a_stage(sb, name, cfg, stop_answering, requested)


def _green_stops_answering_in_a_stage(
        sb: Sandbox, name: str, cfg: Path,
        stop_answering: Callable[[], contextlib.AbstractContextManager[Any]],
        requested: bool) -> None:
    log = sb.base_dir / f"{name}.log"
    asked_log = sb.base_dir / f"{name}-rollback.log"
    with h.release_under_load(sb, cfg, log=log) as (proc, load), \
            contextlib.ExitStack() as stack:
        asker = None

        def green_takes_writes() -> bool:
            return (h.green_weight(sb, name) == 20
                    and load.report().acked_by_colour.get("green", 0) > 10)

        assert h.wait_for(green_takes_writes, timeout=180), log.read_text()[-3000:]
        with stop_answering():
            started = time.monotonic()
            if requested:
                asker = stack.enter_context(h.spawned(
                    sb, "rollback", "--config", str(cfg), "--reason",
                    "operator during the freeze", log=asked_log))
            # The release does not wait for the freeze to end: the probe (or the
            # request) ends the stage, traffic goes back to blue, and the rollback
            # stops, saying why (green holds writes blue has not got yet).
            code = proc.wait(timeout=FREEZE_S + 30)
            reacted = time.monotonic() - started
            assert code == 1, log.read_text()[-3000:]
            if asker is not None:
                asked = asker.wait(timeout=10)
                told = time.monotonic() - started - reacted
                said = asked_log.read_text()
                assert asked == 1, said[-3000:]
                assert "green is unreachable" in said, said[-3000:]
                print(f"release reacted in {reacted:.1f}s; the CLI reported {told:.1f}s later")
                assert told < 5.0, f"the waiting CLI reported {told:.1f}s after the release"
            assert h.router(sb).current() == Weights.green_at(0)
            row = h.release_row(sb, name)
            assert row is not None and row["state"] == "rollback"
            if requested:
                # Seen at the next poll, before the probe's verdict (~6 s), though a
                # replication check may be waiting on the frozen green meanwhile.
                assert "operator during the freeze" in row["facts"]["rollback_reason"]
            else:
                assert "green does not answer" in log.read_text()
            assert "green is unreachable" in (row["error"] or "")
            time.sleep(max(0.0, FREEZE_S - reacted))
        # Green answers again: the rerun completes the rollback with green's writes.
        back = h.run_cli(sb, "rollback", "--config", str(cfg))
        assert back.code == 0, back.out + back.err[-3000:]
    report = load.report()
    assert reacted < 20.0
    row = h.rolled_back_row(sb, name)
    assert report.acked_by_colour.get("green", 0) > 0
    h.assert_left_clean(sb, report)


def test_blue_frozen_longer_than_the_receiver_timeout_loses_no_write(
        short_timeouts: Sandbox) -> None:
    """Blue (also the state database) stalls while both sides take writes; after it
    answers again the subscriptions resume by themselves (no disable_on_error), and
    an abort rolls back with every write on blue."""
    sb = short_timeouts
    stages = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True,
              "probe": {"timeout": "2s", "failure_limit": 100}, "stages": [
                  {"weight": 0, "duration": "1s"}, {"weight": 20, "duration": "240s"},
                  {"weight": 100, "duration": "1s"}]}
    cfg = h.write_config(sb, "blue-frozen", canary=stages)
    log = sb.base_dir / "blue-frozen.log"
    with h.release_under_load(sb, cfg, log=log) as (proc, load):
        def green_takes_writes() -> bool:
            return (h.green_weight(sb, "blue-frozen") == 20
                    and load.report().acked_by_colour.get("green", 0) > 10)

        assert h.wait_for(green_takes_writes, timeout=180), log.read_text()[-3000:]
        with frozen(sb.blue):
            time.sleep(FREEZE_S)
        assert h.wait_for(lambda: load.report().acked_by_colour.get("blue", 0) > 0, timeout=30)
        aborted = h.run_cli(sb, "abort", "--config", str(cfg), "--reason", "after the stall")
        assert aborted.code == 0, aborted.out + aborted.err[-3000:] + log.read_text()[-3000:]
        proc.wait(timeout=60)
    report = load.report()
    h.rolled_back_row(sb, "blue-frozen")
    h.assert_left_clean(sb, report)


def test_green_frozen_in_the_window_rolls_back_once_it_answers(
        short_timeouts: Sandbox) -> None:
    """Promoted, waiting in the window: nothing used to notice a paused green. The
    probe does; the rollback cannot finish while green holds writes blue lacks, says
    so, and the rerun after the freeze brings every write to blue."""
    sb = short_timeouts
    stages = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True,
        "probe": PROBE, "stages": [
        {"weight": 0, "duration": "1s"}, {"weight": 100, "duration": "1s"}]}
    cfg = h.write_config(sb, "window-frozen", canary=stages)
    log = sb.base_dir / "window-frozen.log"
    with h.release_under_load(sb, cfg, "--wait-window", log=log) as (proc, load):
        def promoted_with_green_writes() -> bool:
            row = h.release_row(sb, "window-frozen")
            return bool(row and row["state"] == "window"
                        and load.report().acked_by_colour.get("green", 0) > 10)

        assert h.wait_for(promoted_with_green_writes, timeout=180), log.read_text()[-3000:]
        with frozen(sb.green):
            started = time.monotonic()
            code = proc.wait(timeout=FREEZE_S + 30)
            reacted = time.monotonic() - started
            assert code == 1, log.read_text()[-3000:]
            row = h.release_row(sb, "window-frozen")
            assert row is not None and row["state"] == "rollback", row
            assert "green does not answer" in (row["error"] or "") + log.read_text()
            time.sleep(max(0.0, FREEZE_S - reacted))
        back = h.run_cli(sb, "rollback", "--config", str(cfg))
        assert back.code == 0, back.out + back.err[-3000:]
    report = load.report()
    assert reacted < 20.0
    row = h.rolled_back_row(sb, "window-frozen")
    h.assert_left_clean(sb, report)


def test_green_frozen_during_the_initial_copy_fails_the_copy_naming_the_table(
        short_timeouts: Sandbox) -> None:
    """No log line and no error for minutes used to be the answer: the copy pipes
    waited on the frozen server. The watchdog sees no byte move and fails the copy."""
    sb = short_timeouts
    with h.blue_conn(sb) as conn:
        conn.execute("CREATE TABLE public.big_copy (id bigint PRIMARY KEY, pad text)")
        conn.execute("INSERT INTO public.big_copy SELECT g, repeat(md5(g::text), 6) "
                     "FROM generate_series(1, 1500000) g")
    try:
        cfg = h.write_config(sb, "copy-frozen", backup={"enabled": False},
                             sync={"initial_copy": {"stall_timeout": "3s"}})
        log = sb.base_dir / "copy-frozen.log"
        with h.spawned(sb, "release", "--config", str(cfg), log=log) as proc:
            def copying() -> bool:
                with h.blue_conn(sb) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name "
                        "LIKE %s AND query ILIKE 'COPY%%big_copy%%'",
                        (f"{COPY_APP_PREFIX}%",)).fetchone()
                return bool(row and row[0])

            assert h.wait_for(copying, timeout=180, interval=0.05), log.read_text()[-3000:]
            with frozen(sb.green):
                started = time.monotonic()
                code = proc.wait(timeout=60)
                reacted = time.monotonic() - started
                assert code == 1, log.read_text()[-3000:]
        row = h.rolled_back_row(sb, "copy-frozen")
        # Every pipe stalls at once; the first to hit the limit names its table.
        assert re.search(r"copying public\.\w+: no byte moved for 3s", row["error"] or "")
        assert reacted < 3 + 20
        assert h.router(sb).current() == Weights.green_at(0)
        assert not h.blue_fenced(sb)
    finally:
        with h.blue_conn(sb) as conn:
            conn.execute("DROP TABLE public.big_copy")


def test_blue_frozen_with_the_state_stops_the_release_and_the_rerun_resumes(
        short_timeouts: Sandbox) -> None:
    """Blue holds the release's state: when it stops answering nothing can be
    recorded, so the release decides nothing, says so and stops; the rerun after
    the freeze resumes from the recorded state and finishes."""
    sb = short_timeouts
    stages = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True,
        "probe": PROBE, "stages": [
        {"weight": 0, "duration": "1s"}, {"weight": 20, "duration": "20s"},
        {"weight": 100, "duration": "1s"}]}
    cfg = h.write_config(sb, "state-frozen", canary=stages, blue={"statement_deadline": "4s",
                                                                  "connect_timeout": "2s"})
    log = sb.base_dir / "state-frozen.log"
    with h.release_under_load(sb, cfg, log=log) as (proc, load):
        def at_20() -> bool:
            return h.green_weight(sb, "state-frozen") == 20

        assert h.wait_for(at_20, timeout=180), log.read_text()[-3000:]
        with frozen(sb.blue):
            started = time.monotonic()
            code = proc.wait(timeout=120)
            reacted = time.monotonic() - started
            assert code == 1, log.read_text()[-3000:]
            assert "does not answer" in log.read_text()
            time.sleep(max(0.0, FREEZE_S - reacted))
        row = h.release_row(sb, "state-frozen")
        assert row is not None and row["status"] == "running" and row["state"] == "canary"
        again = h.run_cli(sb, "release", "--config", str(cfg))
        assert again.code == 0, again.out + again.err[-3000:]
        back = h.run_cli(sb, "rollback", "--config", str(cfg))
        assert back.code == 0, back.out + back.err[-3000:]
    report = load.report()
    assert reacted < 60.0
    h.assert_left_clean(sb, report)


def test_connections_to_green_cut_during_a_stage_are_retried_and_the_release_promotes(
        short_timeouts: Sandbox) -> None:
    """A reset connection (a router or firewall drop) is not a server that stopped
    answering: every session to green, the orchestrator's and blue's reverse
    subscription's, is cut every 2 s through a 20 % stage, and the release still
    promotes with every acknowledged write on green."""
    sb = short_timeouts
    stages = {"interval": "1s", "window": "10s", "checks": [], "allow_unanalysed": True,
        "probe": PROBE, "stages": [
        {"weight": 0, "duration": "1s"}, {"weight": 20, "duration": "10s"},
        {"weight": 100, "duration": "2s"}]}
    name = "green-cut"
    with Proxy((sb.green.host, sb.green.port), free_port()) as proxy:
        cfg = h.write_config(sb, name, canary=stages,
                             green={"host": proxy.host, "port": proxy.port})
        log = sb.base_dir / f"{name}.log"
        cuts = 0
        with h.release_under_load(sb, cfg, log=log) as (proc, load):
            assert h.wait_for(lambda: h.green_weight(sb, name) == 20, timeout=180), \
                log.read_text()[-3000:]
            while proc.poll() is None and h.green_weight(sb, name) == 20:
                cuts += proxy.cut()
                time.sleep(2.0)
            code = proc.wait(timeout=60)
        report = load.report()
    assert cuts >= 3, f"only {cuts} connections cut"
    assert code == 0, log.read_text()[-3000:]
    row = h.release_row(sb, name)
    assert row is not None and row["status"] == "promoted", row
    assert h.router(sb).current() == Weights.green_at(100)
    with h.green_conn(sb) as g:
        missing = set(report.acked_order_ids) - h.order_ids(g)
    assert missing == set(), f"{len(missing)} acknowledged writes missing on green"
