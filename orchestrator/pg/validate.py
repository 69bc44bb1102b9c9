"""Validation: does green hold what blue holds, and if not, which rows differ?

Three parts, all reported in one ``ValidationReport``:

* schema (``schema_check``): tables, columns and NOT NULL, indexes and their
  validity, constraints (primary key, unique, FOREIGN KEY, CHECK, exclusion) and
  whether they are validated, extensions, sequences;
* data (``diff``): per table, row counts and checksums of primary-key ranges on both
  sides in parallel; a mismatching range is bisected down to the differing keys,
  which are reported with the differing values;
* writes: while replication streams (``catch_up`` given), mismatches are looked at
  again after green provably caught up, and a differing key is reported only once it
  has been compared with its row locked on the publisher (docs/validation.md).

``problems`` are unexplained differences (the release fails); ``notes`` are expected
or informational (columns a migration added, sequences not yet moved, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.config import ValidateConfig
from orchestrator.pg import catalog, diff, generated, matviews, schema_check
from orchestrator.pg.diff import Progress, RowDiff, TablePlan, TableResult
from orchestrator.pg.endpoint import Endpoint, EndpointLike
from orchestrator.pg.names import QualifiedName, parse_qualified
from orchestrator.pg.schema_check import Finding, SequenceResult, Side

__all__ = ["RowDiff", "TableResult", "ValidationReport", "checksum_sql", "render_text",
           "validate"]


@dataclass
class ValidationReport:
    tables: list[TableResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sequences: list[SequenceResult] = field(default_factory=list)
    matviews: list[dict[str, str]] = field(default_factory=list)
    under_writes: bool = False
    max_reported_keys: int = 20
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and all(t.ok for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "notes": self.notes,
            "under_writes": self.under_writes,
            "seconds": round(self.seconds, 3),
            "tables": [t.as_dict(self.max_reported_keys) for t in self.tables],
            "sequences": [s.as_dict() for s in self.sequences],
            "matviews": self.matviews,
            "findings": [f.as_dict() for f in self.findings],
        }


def checksum_sql(table: QualifiedName, cols: list[str], checksums: bool) -> sql.Composed:
    """The shape of one chunk's checksum query, for ``orchestrate plan``.

    The plan does not read column types, so this shows every column hashed through
    its text form; the validation itself uses the type's own hash function where it
    can, and adds the key range of each chunk (``WHERE (key) >= .. AND (key) < ..``).
    """
    if not checksums or not cols:
        return sql.SQL("SELECT count(*) FROM {}").format(table.ident)
    pairs = [schema_check.ColumnPair(c, c, "", "", "", True) for c in cols]
    plan = TablePlan(table, pairs, [])
    query, _ = diff.checksum_query(plan, "blue", diff.KeyRange(), strong=False)
    return query


def validate(
    blue_db: EndpointLike,
    green_db: EndpointLike,
    cfg: ValidateConfig,
    *,
    control_schema: str,
    exclude_tables: Iterable[str | QualifiedName] = (),
    catch_up: Callable[[], None] | None = None,
    expect_sequences_ahead: bool = False,
    publisher: Side = "blue",
    progress: Progress | None = None,
) -> ValidationReport:
    """Compare green with blue.

    ``catch_up``: when replication streams, blocks until the subscriber applied all
    the publisher had committed when it was called (replication.wait_applied).
    ``publisher``: the side whose writes stream to the other (blue before promotion,
    green after it); differing rows are locked there while they are confirmed.
    ``expect_sequences_ahead``: green already takes writes, so a green sequence behind
    blue's is a problem (before that it is a note: orchestrate moves them later).
    """
    blue_db, green_db = Endpoint.of(blue_db, "blue"), Endpoint.of(green_db, "green")
    started = time.monotonic()
    report = ValidationReport(under_writes=catch_up is not None,
                              max_reported_keys=cfg.max_reported_keys)
    exclude = (control_schema,)
    exclude_tables = tuple(exclude_tables)
    plans: list[TablePlan] = []
    with blue_db.connection("validate") as blue, green_db.connection("validate") as green:
        blue_tables = catalog.user_tables(blue, exclude_schemas=exclude,
                                          exclude_tables=exclude_tables)
        green_tables = catalog.user_tables(green, exclude_schemas=exclude,
                                           exclude_tables=exclude_tables)
        green_names = {t.qname for t in green_tables}
        common = [t for t in blue_tables if t.qname in green_names]
        names = {t.qname for t in common}
        report.findings += schema_check.check_tables(blue_tables, green_tables)
        for table in common:
            plan, found = _plan(blue, green, table, cfg)
            plans.append(plan)
            report.findings += found
        report.findings += schema_check.check_by_name(
            schema_check.INDEX_CHECK, blue, green, exclude_schemas=exclude, tables=names)
        report.findings += schema_check.check_by_name(
            schema_check.CONSTRAINT_CHECK, blue, green, exclude_schemas=exclude, tables=names)
        report.findings += schema_check.check_extensions(blue, green)
        report.sequences, found = schema_check.check_sequences(
            blue, green, exclude_schemas=exclude, exclude_tables=exclude_tables,
            expect_ahead=expect_sequences_ahead)
        report.findings += found
        _compare_matviews(report, blue, green, exclude)
    report.tables = diff.compare_tables(blue_db, green_db, cfg, plans, catch_up=catch_up,
                                        publisher=publisher, progress=progress)
    for f in report.findings:
        (report.problems if f.severity == "problem" else report.notes).append(f.message)
    for t in report.tables:
        _table_messages(report, t, cfg)
    report.seconds = time.monotonic() - started
    return report


def by_table(entries: Mapping[str, Any]) -> dict[QualifiedName, Any]:
    """A config mapping keyed by ``schema.table`` text, keyed by names instead."""
    return {parse_qualified(k): v for k, v in entries.items()}


def _plan(blue: psycopg.Connection[Any], green: psycopg.Connection[Any], table: catalog.Table,
          cfg: ValidateConfig) -> tuple[TablePlan, list[Finding]]:
    name = table.qname
    pairs, green_only, found = schema_check.pair_columns(
        name, schema_check.column_info(blue, name), schema_check.column_info(green, name),
        mapping=by_table(cfg.column_map).get(name, {}),
        ignore=set(by_table(cfg.ignore_columns).get(name, [])),
        same_expression=partial(generated.same, green, name))
    by_blue = {p.blue: p for p in pairs}
    key = [by_blue[k] for k in table.key if k in by_blue]
    if table.key and len(key) != len(table.key):
        # A key column that is ignored or has no green counterpart cannot bound ranges.
        found.append(schema_check.note(
            "table", name.display, f"{name}: its key ({', '.join(table.key)}) is not on both "
            "sides; compared as a whole table"))
        key = []
    elif not table.key:
        found.append(schema_check.note(
            "table", name.display, f"{name} has no primary key: compared as a whole table (a "
            "multiset of rows), not in key ranges"))
    rows, pages = diff.estimate(blue, name)
    return TablePlan(name, pairs, key, green_only, rows, pages), found


# ------------------------------------------------------- materialized views
# Replication does not carry their contents; the release refreshes them on green once
# (matviews.refresh_all). Their rows change only when refreshed, so blue's and green's
# can be compared exactly whatever replication is doing: equal, or green's equal to
# what blue's query gives now (blue's view is older than its tables), is a match.


def _compare_matviews(report: ValidationReport, blue: psycopg.Connection[Any],
                      green: psycopg.Connection[Any], exclude: tuple[str, ...]) -> None:
    on_green = {m.qualified: m for m in matviews.matviews(green, exclude_schemas=exclude)}
    for mv in matviews.matviews(blue, exclude_schemas=exclude):
        name = mv.qualified
        row = {"matview": name, "blue": "", "green": "", "verdict": "ok"}
        report.matviews.append(row)
        gmv = on_green.get(name)
        if gmv is None:
            row["verdict"] = "missing on green"
            report.problems.append(f"materialized view {name} is missing on green")
            continue
        if not mv.populated:
            row["verdict"] = "not compared (unpopulated on blue)"
            report.notes.append(f"materialized view {name} is not populated on blue; not "
                                "compared")
            continue
        if not gmv.populated:
            row["verdict"] = "unpopulated on green"
            report.problems.append(
                f"materialized view {name} is not populated on green: reading it fails "
                "there (REFRESH MATERIALIZED VIEW it on green)")
            continue
        g = matviews.contents(green, gmv)
        b = matviews.contents(blue, mv)
        row["blue"], row["green"] = str(b), str(g)
        if g == b:
            continue
        stored, current = matviews.contents_and_definition(blue, mv)
        if g == current:
            row["verdict"] = "ok (current)"
            report.notes.append(
                f"materialized view {name}: blue's is older than its tables ({stored}; its "
                f"query gives {current} now, as green's holds); the application's refresh "
                "schedule decides when blue's catches up")
            continue
        if report.under_writes and not (g.rows == 0 and current.rows > 0):
            row["verdict"] = "unconfirmed"
            report.notes.append(
                f"materialized view {name}: green's ({g}) was refreshed once before traffic "
                f"and the tables it reads changed since; blue's holds {b}, its query gives "
                f"{current} now")
            continue
        row["verdict"] = "DIFFERS"
        report.problems.append(
            f"materialized view {name} differs: blue {b}, blue's query now {current}, "
            f"green {g}")


def _show(value: str | None, width: int = 60) -> str:
    """NULL, or the value quoted: NULL and '' must read differently."""
    if value is None:
        return "NULL"
    text = value if len(value) <= width else value[: width - 3] + "..."
    return "'" + text.replace("'", "''") + "'"


def describe_diff(d: RowDiff) -> str:
    if d.kind == "changed":
        return "; ".join(f"{col}: blue {_show(b)}, green {_show(g)}"
                         for col, (b, g) in d.changes.items())
    where = "missing on green" if d.kind == "missing_on_green" else "extra on green"
    times = f" ({d.count} copies)" if d.count != 1 else ""
    if d.key:
        return where + times
    row = ", ".join(f"{c}={_show(v, 20)}" for c, v in (d.row or {}).items())
    return f"row ({row}) {where}{times}"


def _table_messages(report: ValidationReport, t: TableResult, cfg: ValidateConfig) -> None:
    if t.error:
        report.problems.append(f"{t.table}: could not be compared: {t.error}")
        return
    if t.diffs:
        _diff_problems(report, t, cfg)
    if t.unexplained:
        report.problems.append(f"{t.table}: {t.unexplained}")
    if t.method == "counts" and t.blue_rows != t.green_rows:
        report.problems.append(f"{t.table}: {t.blue_rows} rows on blue, {t.green_rows} on green")
    _unsettled_notes(report, t)


def _diff_problems(report: ValidationReport, t: TableResult, cfg: ValidateConfig) -> None:
    """One summary line per table, then one line per differing key (up to the limit)."""
    kinds = {k: sum(d.count for d in t.diffs if d.kind == k)
             for k in ("missing_on_green", "extra_on_green", "changed")}
    parts = [f"{n} {k.replace('_', ' ')}" for k, n in kinds.items() if n]
    more = "at least " if not t.complete else ""
    report.problems.append(f"{t.table}: {more}{t.differing_keys} differing row(s) "
                           f"({', '.join(parts)})")
    for d in t.diffs[: cfg.max_reported_keys]:
        report.problems.append(f"{t.table} {d.key_text()}: {describe_diff(d)}")


def _unsettled_notes(report: ValidationReport, t: TableResult) -> None:
    """Rows that differed but were never shown to differ: notes, not problems."""
    if t.unconfirmed:
        report.notes.append(f"{t.table}: {t.unconfirmed} row(s) kept changing while compared "
                            "and could not be confirmed either way")
    if t.transient:
        why = ("changes in flight" if report.under_writes else
               "changes during the validation, or keys that sort differently on the two "
               "sides (collation)")
        report.notes.append(f"{t.table}: {t.transient} row(s) differed at first and matched "
                            f"when looked up again ({why})")


def render_text(report: ValidationReport) -> str:
    """A readable report for the CLI: one line per table, then problems and notes."""
    lines = _render_tables(report)
    lines += _render_sequences(report)
    lines += _render_matviews(report)
    lines += _render_differing(report)
    lines += _render_list("problems", report.problems)
    lines += _render_list("notes", report.notes)
    lines += ["", f"{'OK: green matches blue' if report.ok else 'FAILED: green differs'} "
                  f"({report.seconds:.1f}s)"]
    return "\n".join(lines)


def _verdict(t: TableResult) -> str:
    if t.error:
        return "ERROR"
    if t.ok:
        return "ok" if t.method == "chunked" else f"ok ({t.method})"
    return "DIFFERS"


def _render_tables(report: ValidationReport) -> list[str]:
    head = f"{'table':<40} {'blue rows':>12} {'green rows':>12} {'chunks':>7} " \
           f"{'diff keys':>9}  verdict"
    lines = [head, "-" * len(head)]
    for t in report.tables:
        keys = f"{'>=' if not t.complete else ''}{t.differing_keys}"
        lines.append(f"{t.table:<40} {t.blue_rows:>12} {t.green_rows:>12} {t.chunks:>7} "
                     f"{keys:>9}  {_verdict(t)}")
    if report.under_writes:
        lines.append("(compared while replication streams: row counts are taken at slightly "
                     "different moments; differences were confirmed after catch-up)")
    return lines


def _render_sequences(report: ValidationReport) -> list[str]:
    behind = [s for s in report.sequences if s.status != "ahead"]
    if not behind:
        return []
    lines = ["", f"{'sequence':<40} {'blue':>14} {'green':>14}  status"]
    lines += [f"{s.sequence:<40} {s.blue!s:>14} {s.green!s:>14}  {s.status}" for s in behind]
    return lines


def _render_differing(report: ValidationReport) -> list[str]:
    lines: list[str] = []
    for t in report.tables:
        if not t.diffs:
            continue
        shown = t.diffs[: report.max_reported_keys]
        lines += ["", f"differing rows of {t.table} (first {len(shown)} of "
                      f"{'at least ' if not t.complete else ''}{t.differing_keys}):"]
        lines += [f"  {d.key_text():<30} {describe_diff(d)}" for d in shown]
    return lines


def _render_list(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    return ["", f"{title} ({len(items)}):", *(f"  - {i}" for i in items)]


def _render_matviews(report: ValidationReport) -> list[str]:
    if not report.matviews:
        return []
    lines = ["", f"{'materialized view':<40} {'blue':>28} {'green':>28}  verdict"]
    lines += [f"{m['matview']:<40} {m['blue']:>28} {m['green']:>28}  {m['verdict']}"
              for m in report.matviews]
    return lines
