"""`orchestrate plan`: every step of the release and the SQL it would run.

It reads blue (tables, sequences, migration history) when it can reach it, and
writes nothing anywhere. The SQL comes from the same builders the states use, so
the plan cannot drift from what a release does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from orchestrator.canary.analysis import format_window, render
from orchestrator.config import ReleaseConfig
from orchestrator.errors import OrchestrateError
from orchestrator.pg import catalog, fence, migrations, replication, schema, validate
from orchestrator.pg.conn import server_major
from orchestrator.pg.endpoint import Endpoint


@dataclass
class Step:
    state: str
    summary: str
    statements: list[str] = field(default_factory=list)


def _s(composed: sql.Composable) -> str:
    return composed.as_string(None)


@dataclass
class _Blue:
    """What the plan reads of blue; placeholders when blue cannot be reached."""

    tables: list[catalog.Table] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=lambda: {
        "encoding": "UTF8", "lc_collate": "<blue's>", "lc_ctype": "<blue's>"})
    major: int | None = None


def _read_blue(cfg: ReleaseConfig, notes: list[str]) -> _Blue:
    found = _Blue()
    try:
        with Endpoint(cfg.blue, "blue").connect("plan", attempts=1) as blue:
            blue.read_only = True
            found.tables = catalog.user_tables(
                blue, exclude_schemas=(cfg.state.schema_name,),
                exclude_tables=tuple(cfg.sync.exclude_tables))
            found.settings = schema.database_settings(blue)
            found.major = server_major(blue)
    except OrchestrateError as exc:
        notes.append(f"blue not reachable ({exc.message}); table lists are placeholders")
    return found


def build(cfg: ReleaseConfig) -> tuple[list[Step], list[str]]:
    notes: list[str] = []
    control = cfg.state.schema_name
    blue = _read_blue(cfg, notes)
    tables = blue.tables
    found = migrations.discover(cfg.migrations.dir)
    steps: list[Step] = []
    steps.append(Step("preflight", "read-only checks: connectivity, wal_level=logical on both "
                      "sides, replication privileges, primary keys / replica identity, roles "
                      "and extensions on green, migration lint, router and Prometheus "
                      "reachable"))
    steps.append(_backup_step(cfg))
    steps.append(Step(
        "provision",
        f"create database {cfg.green.dbname} on green if missing; pg_dump --schema-only "
        f"--exclude-schema {control} of blue restored by psql --single-transaction",
        [_s(schema.create_database_sql(cfg.green.dbname, blue.settings)),
         schema.marker_sql(control, cfg.release.name)]))
    steps.append(Step(
        "migrate", f"{len(found)} migration(s) from {cfg.migrations.dir}, each in its own "
        f"transaction, tracked in {control}.migrations",
        [f"-- {m.migration_name} (sha256 {m.checksum[:12]})\n{m.up_sql.strip()}"
         for m in found]))
    steps.append(_sync_step(cfg, tables))
    steps.append(Step(
        "validate", "row counts and content checksums per table, both sides in parallel; "
        "indexes and constraints present and valid on green",
        [_s(validate.checksum_sql(t.qname, [c.name for c in t.columns if not c.generated],
                                  cfg.validate_.checksums)) for t in tables[:20]]))
    steps += _canary_steps(cfg)
    steps.append(_promote_step(cfg))
    steps.append(Step("cleanup", "after the window: drop publications, subscriptions and slots "
                      "on both sides"))
    if blue.major is not None and blue.major < 16:
        notes.append(f"blue runs PostgreSQL {blue.major}: green takes writes only at one "
                     "switchover (no partial stages unless sync.accept_write_loss_risk)")
    return steps, notes


def _backup_step(cfg: ReleaseConfig) -> Step:
    if not cfg.backup.enabled:
        return Step("backup", "disabled in the config")
    suffix = ".dump" if cfg.backup.format == "custom" else ".dir"
    target = cfg.backup.dir / f"{cfg.release.name}-blue{suffix}"
    return Step("backup", f"pg_dump --format {cfg.backup.format} of "
                f"{cfg.blue.describe()} to {target}, verified with pg_restore --list, "
                "sha256 recorded")


def _sync_step(cfg: ReleaseConfig, tables: list[catalog.Table]) -> Step:
    fwd = replication.forward(cfg.release.name)
    heartbeat = catalog.Table(cfg.state.schema_name, replication.HEARTBEAT_TABLE, ["direction"])
    pub_tables = [*tables, heartbeat] if tables else [catalog.Table("<schema>", "<table>")]
    redacted = Endpoint(cfg.blue, "blue").redacted_peer_conninfo()
    return Step(
        "sync", f"logical replication blue -> green of {len(tables)} table(s), initial copy "
        f"then streaming, until green applied blue's latest commit",
        [_s(replication.publication_sql(fwd.publication, pub_tables)) + ";  -- on blue",
         _s(replication.subscription_sql(fwd.subscription, redacted, fwd.publication,
                                         replication.SubscriptionOptions())) + ";  -- on green"])


def _canary_steps(cfg: ReleaseConfig) -> list[Step]:
    labels = cfg.template_variables(window=format_window(cfg.canary.window))
    checks = [f"{c.name}: {render(c.query, labels, 'green')} {c.describe_limits()}"
              + (f"; blue: {render(c.baseline_query, labels, 'blue')}"
                 if c.baseline_query else "")
              for c in cfg.canary.checks]
    # The checks are the same at every stage: listed once, under the first.
    return [Step(
        "canary", f"stage {i}: {stage.weight}% of traffic to green for {stage.duration:.0f}s,"
        f" checks every {cfg.canary.interval_for(stage):.0f}s"
        + (" (after manual approval)" if stage.manual_gate else ""), checks if i == 1 else [])
        for i, stage in enumerate(cfg.canary.stages, 1)]


def _promote_step(cfg: ReleaseConfig) -> Step:
    promote_sql = []
    if cfg.blue.app_role:
        promote_sql.append(_s(fence.fence_sql(cfg.blue.app_role, cfg.blue.dbname)) + ";")
    promote_sql.append("-- wait until green applied blue's last commit (heartbeat); move "
                       "green's sequences past blue's + margin; keep green -> blue replication")
    return Step("promote", "green takes all writes; blue is fenced and kept current for "
                f"the rollback window ({cfg.rollback.window:.0f}s)", promote_sql)


def render_text(cfg: ReleaseConfig, steps: list[Step], notes: list[str]) -> str:
    lines = [f"Release {cfg.release.name}: {cfg.blue.describe()} (blue) -> "
             f"{cfg.green.describe()} (green)", ""]
    for i, step in enumerate(steps, 1):
        lines.append(f"{i:2}. [{step.state}] {step.summary}")
        for stmt in step.statements:
            for ln in stmt.splitlines():
                lines.append(f"      {ln}")
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    lines.append("")
    lines.append("Nothing was changed (dry run).")
    return "\n".join(lines)


def as_json(steps: list[Step], notes: list[str]) -> dict[str, Any]:
    return {"steps": [step.__dict__ for step in steps], "notes": notes}
