"""Bad input changes nothing; a killed orchestrator resumes; two cannot run at once."""

from __future__ import annotations

import signal

import pytest

from orchestrator.sandbox.stack import Sandbox
from tests.integration import helpers as h

pytestmark = pytest.mark.slow


def _green_db_exists(sb: Sandbox) -> bool:
    with h.green_conn(sb, "postgres") as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = 'shop'").fetchone() \
            is not None


def test_config_error_names_the_field_and_changes_nothing(sandbox_16_17: Sandbox) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    cfg = h.write_config(sb, "bad-config")
    cfg.write_text(cfg.read_text().replace("interval: 1s", "interval: soon"))
    result = h.run_cli(sb, "release", "--config", str(cfg))
    assert result.code == 2
    assert "invalid configuration: canary.interval" in result.err
    assert "Traceback" not in result.err
    assert h.release_row(sb, "bad-config") is None and not _green_db_exists(sb)


def test_table_without_primary_key_is_refused_in_preflight(sandbox_16_17: Sandbox) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    with h.blue_conn(sb) as conn:
        conn.execute("CREATE TABLE public.audit_log (at timestamptz, what text)")
    try:
        cfg = h.write_config(sb, "no-pk")
        result = h.run_cli(sb, "release", "--config", str(cfg))
        assert result.code == 2
        assert "public.audit_log has no primary key or replica identity" in result.err
        assert "REPLICA IDENTITY FULL" in result.err and "exclude_tables" in result.err
        assert "Traceback" not in result.err
        assert h.release_row(sb, "no-pk") is None and not _green_db_exists(sb)
    finally:
        with h.blue_conn(sb) as conn:
            conn.execute("DROP TABLE public.audit_log")


def test_killed_mid_sync_resumes_and_a_second_orchestrator_is_locked_out(
        sandbox_16_17: Sandbox) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    # Enough rows that the initial copy takes a few seconds to kill it inside.
    with h.blue_conn(sb) as conn:
        conn.execute("CREATE TABLE public.big (id bigint PRIMARY KEY, payload text NOT NULL)")
        conn.execute("INSERT INTO public.big SELECT g, repeat(md5(g::text), 4) "
                     "FROM generate_series(1, 1500000) g")
    try:
        cfg = h.write_config(sb, "resume")
        log = sb.base_dir / "resume-1.log"
        proc = h.spawn_cli(sb, "release", "--config", str(cfg), log=log)

        def copying() -> bool:
            # The copy's slot exists from the first row copied to the subscription.
            row = h.release_row(sb, "resume")
            if not row or row["state"] != "sync":
                return False
            with h.blue_conn(sb) as b:
                return b.execute("SELECT 1 FROM pg_replication_slots "
                                 "WHERE slot_name = 'orch_resume_fwd'").fetchone() is not None

        assert h.wait_for(copying, timeout=90, interval=0.02), log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        row = h.release_row(sb, "resume")
        assert row is not None and row["state"] == "sync" and row["status"] == "running"
        with h.green_conn(sb) as g:
            copied = g.execute("SELECT count(*) FROM public.big").fetchone()[0]
        assert copied < 1_500_000, "the kill came after the copy; nothing was resumed"

        resumed_log = sb.base_dir / "resume-2.log"
        resumed = h.spawn_cli(sb, "release", "--config", str(cfg), log=resumed_log)
        assert h.wait_for(lambda: "resuming release" in resumed_log.read_text(), timeout=60)
        # While it runs, a second orchestrator must be refused.
        second = h.run_cli(sb, "release", "--config", str(cfg))
        assert second.code == 3, second.err
        assert "another orchestrator" in second.err
        assert resumed.wait(timeout=400) == 0, resumed_log.read_text()[-3000:]
        row = h.release_row(sb, "resume")
        assert row is not None and row["status"] == "promoted"
        validation = row["facts"]["validation"]
        assert validation["ok"] is True
        big = next(t for t in validation["tables"] if t["table"] == "public.big")
        assert big["blue_rows"] == big["green_rows"] == 1_500_000
        with h.green_conn(sb) as g:
            assert g.execute("SELECT count(*) FROM public.big").fetchone()[0] == 1_500_000
        # Exactly one forward slot was ever in use; nothing leaked from the killed run.
        back = h.run_cli(sb, "rollback", "--config", str(cfg))
        assert back.code == 0, back.err[-2000:]
        assert h.replication_leftovers(sb) == []
    finally:
        with h.blue_conn(sb) as conn:
            conn.execute("DROP TABLE IF EXISTS public.big")


def test_plan_prints_sql_and_changes_nothing(sandbox_16_17: Sandbox) -> None:
    sb = sandbox_16_17
    h.reset(sb)
    cfg = h.write_config(sb, "plan-only")
    result = h.run_cli(sb, "plan", "--config", str(cfg))
    assert result.code == 0, result.err
    for needle in ("CREATE PUBLICATION", "CREATE SUBSCRIPTION", "0001_order_status",
                   "ALTER TABLE", "hashtextextended", "default_transaction_read_only",
                   "password=***", "Nothing was changed"):
        assert needle in result.out, needle
    assert sb.green.password not in result.out and sb.blue.password not in result.out
    assert h.release_row(sb, "plan-only") is None and not _green_db_exists(sb)
    assert h.replication_leftovers(sb) == []
