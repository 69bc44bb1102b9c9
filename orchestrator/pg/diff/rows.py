"""Rows of a comparison: fetching them by range, key or hash, and naming what differs.

A row travels as its key text, one 64-bit hash term per column and the column
values in their text form (``queries.fetch_query``): the terms decide what
differs, the text is what a report shows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from orchestrator.pg.columns import Side
from orchestrator.pg.diff.queries import (
    Key,
    KeyRange,
    TablePlan,
    fetch_query,
    hash_counts_query,
    keys_predicate,
    range_predicate,
    rows_by_hash_query,
)
from orchestrator.pg.names import with_params

Conn = psycopg.Connection[Any]

_LOOKUP_BATCH = 500


@dataclass(frozen=True)
class ChunkSum:
    rows: int
    sums: tuple[str | None, ...]


@dataclass(frozen=True)
class FetchedRow:
    key: Key
    terms: tuple[int, ...]
    values: tuple[str | None, ...]


Rows = dict[Key, FetchedRow]  # by key


@dataclass
class RowDiff:
    """One differing row: by key, or (table without a key) by content."""

    key: dict[str, str]
    kind: Literal["missing_on_green", "extra_on_green", "changed"]
    # column label -> (blue value, green value), text forms; None is SQL NULL
    changes: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    row: dict[str, str | None] | None = None  # the whole row, for missing/extra
    count: int = 1  # how many copies (tables without a key)

    def key_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.key.items()) or "(no key)"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "kind": self.kind}
        if self.changes:
            out["changes"] = {c: {"blue": b, "green": g} for c, (b, g) in self.changes.items()}
        if self.row is not None:
            out["row"] = self.row
        if self.count != 1:
            out["count"] = self.count
        return out


def parse_rows(plan: TablePlan, rows: Iterable[Sequence[Any]]) -> Rows:
    nk, nc = len(plan.key), len(plan.columns)
    out: dict[Key, FetchedRow] = {}
    for r in rows:
        key = tuple(str(v) for v in r[:nk])
        out[key] = FetchedRow(key, tuple(int(v) for v in r[nk:nk + nc]), tuple(r[nk + nc:]))
    return out


def key_sort(key: Key) -> tuple[tuple[int, float, str], ...]:
    """Numbers in numeric order, anything else by text: good enough for a report."""
    out = []
    for v in key:
        try:
            out.append((0, float(v), v))
        except ValueError:
            out.append((1, 0.0, v))
    return tuple(out)


def diff_rows(plan: TablePlan, blue: dict[Key, FetchedRow], green: dict[Key, FetchedRow],
              keys: Iterable[Key] | None = None) -> list[RowDiff]:
    """Differences between the rows of both sides, matched by key.

    A column differs when its hash term differs: the same notion of "equal" as the
    checksums (the text forms are what the report shows).
    """
    labels = [p.label for p in plan.columns]
    names = plan.key_names
    out: list[RowDiff] = []
    for key in sorted(set(keys) if keys is not None else set(blue) | set(green), key=key_sort):
        b, g = blue.get(key), green.get(key)
        named = dict(zip(names, key, strict=True))
        if b is not None and g is None:
            out.append(RowDiff(named, "missing_on_green", row=dict(zip(labels, b.values,
                                                                        strict=True))))
        elif g is not None and b is None:
            out.append(RowDiff(named, "extra_on_green", row=dict(zip(labels, g.values,
                                                                      strict=True))))
        elif b is not None and g is not None and b.terms != g.terms:
            changes = {labels[i]: (b.values[i], g.values[i])
                       for i in range(len(labels)) if b.terms[i] != g.terms[i]}
            out.append(RowDiff(named, "changed", changes))
    return out


# ---------------------------------------------------------------- results


@dataclass
class TableResult:
    table: str  # as PostgreSQL quotes it (QualifiedName.display): reports are for people
    blue_rows: int = 0
    green_rows: int = 0
    method: Literal["chunked", "whole-table", "counts"] = "chunked"
    chunks: int = 0
    mismatched_chunks: int = 0  # still mismatching after the re-checks
    ranges_compared: int = 0  # checksum comparisons, bisection included
    compared_columns: list[str] = field(default_factory=list)
    green_only_columns: list[str] = field(default_factory=list)
    diffs: list[RowDiff] = field(default_factory=list)
    complete: bool = True  # False: the search stopped at validate.max_diff_keys
    unconfirmed: int = 0  # differing rows that kept changing under writes
    transient: int = 0  # rows that differed at first look and matched when looked up again
    unexplained: str | None = None  # checksums differ, no row could be named
    error: str | None = None
    seconds: float = 0.0

    @property
    def differing_keys(self) -> int:
        return sum(d.count for d in self.diffs)

    @property
    def ok(self) -> bool:
        if self.error or self.unexplained or self.diffs:
            return False
        return self.method != "counts" or self.blue_rows == self.green_rows

    def as_dict(self, max_keys: int) -> dict[str, Any]:
        return {
            "table": self.table, "blue_rows": self.blue_rows, "green_rows": self.green_rows,
            "ok": self.ok, "method": self.method, "chunks": self.chunks,
            "mismatched_chunks": self.mismatched_chunks,
            "ranges_compared": self.ranges_compared,
            "checksum_match": self.ok, "differing_keys": self.differing_keys,
            "complete": self.complete, "unconfirmed": self.unconfirmed,
            "transient": self.transient,
            "unexplained": self.unexplained, "error": self.error,
            "compared_columns": self.compared_columns,
            "green_only_columns": self.green_only_columns,
            "seconds": round(self.seconds, 3),
            "diffs": [d.as_dict() for d in self.diffs[:max_keys]],
        }



# ---------------------------------------------------------------- fetching


def fetch_range(plan: TablePlan, rng: KeyRange, limit: int, conn: Conn, side: Side
                ) -> Rows:
    where, params = range_predicate(plan, side, rng)
    rows = conn.execute(with_params(fetch_query(plan, side, where, limit=limit, lock=False),
                                    conn), params).fetchall()
    return parse_rows(plan, rows)


def lookup(plan: TablePlan, keys: Sequence[Key], conn: Conn, side: Side, *,
           lock: bool = False) -> Rows:
    out: dict[Key, FetchedRow] = {}
    for i in range(0, len(keys), _LOOKUP_BATCH):
        where, params = keys_predicate(plan, side, keys[i:i + _LOOKUP_BATCH])
        rows = conn.execute(with_params(fetch_query(plan, side, where, limit=None,
                                                    lock=lock), conn), params).fetchall()
        out.update(parse_rows(plan, rows))
    return out


def hash_counts(plan: TablePlan, conn: Conn, side: Side) -> Counter[int]:
    query = hash_counts_query(plan, side)
    return Counter({int(r[0]): int(r[1]) for r in conn.execute(query).fetchall()})


def rows_by_hash(plan: TablePlan, hashes: list[int], conn: Conn, side: Side
                 ) -> dict[int, tuple[str | None, ...]]:
    query = rows_by_hash_query(plan, side)
    out: dict[int, tuple[str | None, ...]] = {}
    for r in conn.execute(with_params(query, conn), [hashes]).fetchall():
        out.setdefault(int(r[0]), tuple(r[1:]))
    return out


def whole_table_diffs(plan: TablePlan, wanted: list[int], extra_blue: Counter[int],
                      extra_green: Counter[int], b_rows: dict[int, tuple[str | None, ...]],
                      g_rows: dict[int, tuple[str | None, ...]]) -> list[RowDiff]:
    """The rows of a table without a key that one side holds more copies of, by hash."""
    labels = [p.label for p in plan.columns]
    diffs: list[RowDiff] = []
    for h in wanted:
        if h in extra_blue and h in b_rows:
            diffs.append(RowDiff({}, "missing_on_green", row=dict(zip(labels, b_rows[h],
                                                                      strict=True)),
                                 count=extra_blue[h]))
        elif h in extra_green and h in g_rows:
            diffs.append(RowDiff({}, "extra_on_green", row=dict(zip(labels, g_rows[h],
                                                                    strict=True)),
                                 count=extra_green[h]))
    return diffs

