"""``validate``: how green's content is compared with blue's."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from orchestrator.config._base import Duration, _Model
from orchestrator.pg.names import parse_qualified


class ValidateConfig(_Model):
    """How green is compared with blue (see docs/validation.md)."""

    # False: row counts only (no content checksums, no row diffs).
    checksums: bool = True
    # Rows per first-level chunk (a primary-key range). Smaller chunks make a mismatch
    # cheaper to narrow down; larger ones mean fewer queries (each costs ~0.3 ms of
    # planning and round trip, against ~6 ms of reading for 20,000 rows).
    chunk_rows: int = Field(default=20_000, ge=100)
    # Worker connections per side: blue and green queries run in parallel, each side
    # with this many connections.
    parallelism: int = Field(default=2, ge=1, le=64)
    # Differing keys listed per table in problems and in the report.
    max_reported_keys: int = Field(default=20, ge=1)
    # Column mapping for tables whose shape the migration changes on purpose:
    # {"public.orders": {"amount_cents": "amount"}} means green's amount_cents holds
    # blue's amount.
    column_map: dict[str, dict[str, str]] = Field(default_factory=dict)
    ignore_columns: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("column_map", "ignore_columns")
    @classmethod
    def _table_keys(cls, entries: dict[str, Any]) -> dict[str, Any]:
        for t in entries:
            parse_qualified(t)
        return entries

    # Bisection: a mismatching range is split into enough parts (at most
    # split_factor) that each should hold at most leaf_rows rows, and again while a
    # part holds more; then its rows are fetched from both sides and compared by key.
    split_factor: int = Field(default=256, ge=2, le=1024)
    leaf_rows: int = Field(default=128, ge=1, le=10_000)
    # Differing keys collected per table before the search stops (the report then
    # says "at least N").
    max_diff_keys: int = Field(default=1000, ge=1)
    # While replication streams: how many times a mismatching chunk is compared again
    # after a catch-up, and how many rounds a differing key must survive.
    recheck_rounds: int = Field(default=3, ge=1, le=20)
    # Lock the differing rows on the publishing side (SELECT .. FOR SHARE) while the
    # subscriber catches up, so that a confirmed difference is exact. Writers to those
    # few rows wait for at most the catch-up.
    lock_rows: bool = True
    lock_timeout: Duration = 2.0
    # Two independent 64-bit row hashes per chunk instead of one (about 1.5x the CPU).
    strong_checksums: bool = False
    statement_timeout: Duration = 3600.0
    # Tables without a primary key are compared whole; above this many rows the
    # differing rows themselves are not searched for.
    nokey_diff_max_rows: int = Field(default=1_000_000, ge=0)
