"""Preflight: every precondition of the release, checked read-only, reported at once.

Nothing here writes anywhere. Problems are collected rather than raised one by one,
so that a person fixes them all in one round instead of discovering them serially.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from orchestrator.canary.analysis import render
from orchestrator.canary.metrics import MetricsSource, MetricsUnavailable
from orchestrator.config import ReleaseConfig
from orchestrator.errors import OrchestrateError, PreflightError
from orchestrator.pg import catalog, migrations, schema
from orchestrator.pg.conn import scalar, server_major
from orchestrator.pg.endpoint import Endpoint
from orchestrator.pg.tools import find_tools
from orchestrator.routers.base import TrafficRouter

# origin = none (loop-free replication in both directions) arrived in PostgreSQL 16.
BIDIRECTIONAL_MIN_MAJOR = 16
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")


@dataclass
class PreflightReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    majors: dict[str, int] = field(default_factory=dict)
    mode: str = "unknown"

    def raise_if_failed(self) -> None:
        if not self.problems:
            return
        numbered = "\n".join(f"  {i}. {p}" for i, p in enumerate(self.problems, 1))
        raise PreflightError(
            f"preflight found {len(self.problems)} problem(s); nothing was changed:\n{numbered}",
            hint="fix them and run the same command again")


def _try_connect(db: Endpoint, report: PreflightReport, what: str,
                 dbname: str | None = None) -> psycopg.Connection[Any] | None:
    try:
        return db.connect("preflight", dbname=dbname, attempts=2)
    except OrchestrateError as exc:
        report.problems.append(f"{what}: {exc.message}")
        return None


def run(cfg: ReleaseConfig, *, router: TrafficRouter, metrics: MetricsSource,
        fresh: bool) -> PreflightReport:
    """``fresh``: the release has not started, so green must not hold anything yet."""
    report = PreflightReport()
    control = cfg.state.schema_name
    blue = _try_connect(Endpoint(cfg.blue, "blue"), report, "blue")
    green_server = _try_connect(Endpoint(cfg.green, "green"), report, "green server",
                                dbname="postgres")
    try:
        if blue is not None:
            _check_blue(cfg, blue, report, control)
        if green_server is not None:
            _check_green_server(cfg, green_server, report)
        if blue is not None and green_server is not None:
            _check_pair(cfg, blue, green_server, report, control, fresh)
    finally:
        for c in (blue, green_server):
            if c is not None:
                c.close()
    _check_migrations(cfg, report)
    _check_router(router, report)
    _check_metrics(cfg, metrics, report)
    return report


def _check_blue(cfg: ReleaseConfig, blue: psycopg.Connection[Any], report: PreflightReport,
                control: str) -> None:
    major = server_major(blue)
    report.majors["blue"] = major
    _check_blue_publishes(cfg, blue, report)
    _check_blue_tables(cfg, blue, report, control)
    _check_uncarried(cfg, blue, report, control)
    _check_blue_app_role(cfg, blue, report)
    try:
        find_tools(major, cfg.tools.pg_bindir)
    except PreflightError as exc:
        report.problems.append(f"tools: {exc.message} ({exc.hint})")


def _check_blue_publishes(cfg: ReleaseConfig, blue: psycopg.Connection[Any],
                          report: PreflightReport) -> None:
    """What blue needs to be a logical replication publisher."""
    if catalog.setting(blue, "wal_level") != "logical":
        report.problems.append(
            "blue: wal_level is not 'logical'; set wal_level = logical in postgresql.conf and "
            "restart blue (logical replication needs it)")
    free_slots = _free_slots(blue)
    if free_slots < 1:
        report.problems.append("blue: no free replication slot (max_replication_slots); "
                               "raise it or drop unused slots")
    role = blue.execute("SELECT rolsuper, rolreplication FROM pg_roles "
                        "WHERE rolname = current_user").fetchone()
    if role is not None and not (role[0] or role[1]):
        report.problems.append(
            f"blue: role {cfg.blue.user} needs the REPLICATION attribute (or superuser) to "
            "publish changes")


def _check_blue_tables(cfg: ReleaseConfig, blue: psycopg.Connection[Any],
                       report: PreflightReport, control: str) -> None:
    """Every replicated table needs a way to identify its rows' UPDATEs and DELETEs."""
    tables = catalog.user_tables(blue, exclude_schemas=(control,),
                                 exclude_tables=tuple(cfg.sync.exclude_tables))
    for t in tables:
        if not t.key and t.replica_identity != "f":
            report.problems.append(
                f"blue: table {t.qname} has no primary key or replica identity, so "
                "logical replication cannot carry its UPDATEs and DELETEs. Add a primary key, "
                f"or run ALTER TABLE {t.qname} REPLICA IDENTITY FULL (slower), or list it "
                "in sync.exclude_tables")
        elif t.replica_identity == "f" and not t.key:
            report.warnings.append(f"{t.qname} replicates with REPLICA IDENTITY FULL: every "
                                   "UPDATE/DELETE scans the table on green")
    if not tables:
        report.warnings.append("blue has no user tables: only the schema will be carried")


def _check_blue_app_role(cfg: ReleaseConfig, blue: psycopg.Connection[Any],
                         report: PreflightReport) -> None:
    for app_role in filter(None, [cfg.blue.app_role]):
        if not catalog.role_exists(blue, app_role):
            report.problems.append(f"blue: blue.app_role {app_role} does not exist")
    if not cfg.blue.app_role:
        report.warnings.append("blue.app_role is not set: at switchover orchestrate cannot "
                               "fence the application's writes on blue")


def _check_uncarried(cfg: ReleaseConfig, blue: psycopg.Connection[Any],
                     report: PreflightReport, control: str) -> None:
    """What logical replication cannot carry (docs/sync.md, "What replication does not
    carry"): refused when green would silently lack it, warned when orchestrate fills
    it in itself."""
    large_objects = int(scalar(blue, "SELECT count(*) FROM pg_largeobject_metadata"))
    if large_objects:
        report.problems.append(
            f"blue: the database holds {large_objects} large object(s) (pg_largeobject); "
            "logical replication does not carry them, so green would lack them and writes to "
            "them during the release would be lost. Move their contents into bytea columns "
            "(lo_get) or delete unused ones (vacuumlo, lo_unlink) before releasing")
    skip = [*_SYSTEM_SCHEMAS, control]
    excluded = set(cfg.sync.exclude_tables)
    for qualified, root in blue.execute(
        """
        SELECT format('%%s.%%s', n.nspname, c.relname),
               (SELECT rn.nspname || '.' || rc.relname FROM pg_class rc
                JOIN pg_namespace rn ON rn.oid = rc.relnamespace
                WHERE rc.oid = coalesce(pg_partition_root(c.oid), c.oid))
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' AND n.nspname <> ALL(%s)
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                            AND d.deptype = 'e')
        ORDER BY 1
        """, (skip,)).fetchall():
        if root in excluded:
            continue
        report.problems.append(
            f"blue: table {qualified} is UNLOGGED; logical replication does not carry "
            f"unlogged tables. Run ALTER TABLE {qualified} SET LOGGED on blue (rewrites the "
            f"table into WAL), or list {root} in sync.exclude_tables if green may start "
            "without its rows")
    populated = [r[0] for r in blue.execute(
        "SELECT format('%%s.%%s', n.nspname, c.relname) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'm' AND c.relispopulated AND n.nspname <> ALL(%s) ORDER BY 1",
        (skip,)).fetchall()]
    if populated:
        report.warnings.append(
            f"materialized views ({', '.join(populated[:5])}"
            f"{', ...' if len(populated) > 5 else ''}): replication does not carry their "
            "contents; orchestrate refreshes them on green once after the initial copy, and "
            "from then on green's are as fresh as the application's own refresh schedule "
            "makes them")


def _check_green_server(cfg: ReleaseConfig, green: psycopg.Connection[Any],
                        report: PreflightReport) -> None:
    major = server_major(green)
    report.majors["green"] = major
    if catalog.setting(green, "wal_level") != "logical":
        report.problems.append(
            "green: wal_level is not 'logical'; green publishes its changes back to blue "
            "for rollbacks, so set wal_level = logical and restart green")
    if _free_slots(green) < 1:
        report.problems.append("green: no free replication slot (max_replication_slots)")
    row = green.execute(
        "SELECT rolsuper, rolcreatedb, "
        "pg_has_role(current_user, 'pg_create_subscription', 'MEMBER') "
        "FROM pg_roles WHERE rolname = current_user"
        if major >= 16 else
        "SELECT rolsuper, rolcreatedb, false FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if row is not None:
        superuser, createdb, can_subscribe = row
        if not (superuser or can_subscribe):
            report.problems.append(
                f"green: role {cfg.green.user} may not create subscriptions; it needs "
                + ("membership in pg_create_subscription" if major >= 16 else "superuser")
                + " on green")
        if (cfg.green.create_database and not (superuser or createdb)
                and not catalog.database_exists(green, cfg.green.dbname)):
            report.problems.append(f"green: role {cfg.green.user} may not create database "
                                       f"{cfg.green.dbname} (needs CREATEDB)")
    if cfg.green.app_role and not catalog.role_exists(green, cfg.green.app_role):
        report.problems.append(f"green: green.app_role {cfg.green.app_role} does not exist")


def _check_pair(cfg: ReleaseConfig, blue: psycopg.Connection[Any],
                green_server: psycopg.Connection[Any], report: PreflightReport, control: str,
                fresh: bool) -> None:
    b, g = report.majors.get("blue", 0), report.majors.get("green", 0)
    if g < b:
        report.problems.append(f"green runs PostgreSQL {g}, older than blue's {b}: a release "
                               "may upgrade the major version, never downgrade it")
    _choose_mode(cfg, b, g, report)
    _check_green_roles_and_extensions(blue, green_server, report, control)
    if fresh and catalog.database_exists(green_server, cfg.green.dbname):
        _check_green_empty(cfg, report, control)


def _choose_mode(cfg: ReleaseConfig, b: int, g: int, report: PreflightReport) -> None:
    """Bidirectional when both sides can replicate loop-free; else one switchover, and
    partial canary stages would lose green's writes on a rollback."""
    partial = [s.weight for s in cfg.canary.stages if 0 < s.weight < 100]
    if b >= BIDIRECTIONAL_MIN_MAJOR and g >= BIDIRECTIONAL_MIN_MAJOR:
        report.mode = "bidirectional"
        return
    report.mode = "switchover"
    if partial and not cfg.sync.accept_write_loss_risk:
        report.problems.append(
            f"canary stages {partial}% would send writes to green while blue still takes "
            f"writes, but blue runs PostgreSQL {b}: changes made on green cannot flow back "
            "to blue without looping (origin = none needs 16+ on both sides), so a rollback "
            "would LOSE green's writes. Use stages with weights 0 and 100 only (green takes "
            "writes at one switchover with a short write pause), upgrade blue to 16+, or "
            "set sync.accept_write_loss_risk: true to accept the loss")
    elif partial:
        report.warnings.append(
            "sync.accept_write_loss_risk is set: writes green takes during partial canary "
            "stages will not reach blue if the release is rolled back")


def _check_green_roles_and_extensions(blue: psycopg.Connection[Any],
                                      green_server: psycopg.Connection[Any],
                                      report: PreflightReport, control: str) -> None:
    """The roles and extensions blue's schema refers to, which its restore on green needs."""
    for role in sorted(catalog.referenced_roles(blue, exclude_schemas=(control,))):
        if not catalog.role_exists(green_server, role):
            report.problems.append(f"green: role {role} owns or is granted objects on blue but "
                                   "does not exist on green; create it there first")
    missing = set(catalog.extensions(blue)) - catalog.available_extensions(green_server)
    for ext in sorted(missing):
        report.problems.append(f"green: extension {ext} (used on blue) is not available on "
                               "green's server")


def _check_green_empty(cfg: ReleaseConfig, report: PreflightReport, control: str) -> None:
    try:
        green = Endpoint(cfg.green, "green").connect("preflight", attempts=1)
    except OrchestrateError as exc:
        report.problems.append(f"green: {exc.message}")
        return
    with green:
        leftovers = schema.foreign_tables(green, control)
    if leftovers:
        report.problems.append(
            f"green: database {cfg.green.dbname} already holds tables "
            f"({', '.join(leftovers[:5])}); a release needs an empty green database")


def _check_migrations(cfg: ReleaseConfig, report: PreflightReport) -> None:
    try:
        found = migrations.discover(cfg.migrations.dir)
    except PreflightError as exc:
        report.problems.append(f"migrations: {exc.message}")
        return
    if not cfg.migrations.dir.exists():
        report.warnings.append(f"migrations folder {cfg.migrations.dir} does not exist: no "
                               "migrations will be applied")
    if cfg.migrations.lint == "off":
        return
    for finding in migrations.lint(found).findings:
        text = f"migration {finding.migration}: {finding.message}"
        if finding.level == "error" and cfg.migrations.lint == "error":
            report.problems.append(text)
        else:
            report.warnings.append(text)


def _check_router(router: TrafficRouter, report: PreflightReport) -> None:
    try:
        router.check()
    except OrchestrateError as exc:
        report.problems.append(f"router: {exc.message}")


def _check_metrics(cfg: ReleaseConfig, metrics: MetricsSource, report: PreflightReport) -> None:
    try:
        metrics.check()
    except MetricsUnavailable as exc:
        report.problems.append(f"prometheus: {exc.message}")
        return
    if not cfg.canary.checks:
        report.warnings.append("canary.checks is empty (allow_unanalysed): stages advance on "
                               "time alone")
    labels = cfg.template_variables(window="1m")
    for check in cfg.canary.checks:
        # Blue's own query too where it has one: both sides' queries will run.
        try:
            for query in dict.fromkeys([check.query, check.baseline_query or check.query]):
                metrics.query(render(query, labels, "blue"))
        except MetricsUnavailable as exc:
            report.problems.append(f"canary check {check.name}: {exc.message}")


def _free_slots(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT current_setting('max_replication_slots')::int - "
        "(SELECT count(*) FROM pg_replication_slots)").fetchone()
    return int(row[0]) if row else 0
