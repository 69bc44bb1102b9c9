"""Confirming differences: every differing key is looked up again before it is reported.

Without writes one look on both sides does. While replication streams, each round
follows a catch-up and locks the rows on the publisher, so that only real,
persistent differences are reported (see docs/validation.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import psycopg

from orchestrator.config import ValidateConfig
from orchestrator.pg.columns import Side
from orchestrator.pg.diff.queries import Key, TablePlan
from orchestrator.pg.diff.rows import (
    RowDiff,
    Rows,
    TableResult,
    diff_rows,
    key_sort,
    lookup,
)
from orchestrator.pg.diff.sides import SidePool, open_session
from orchestrator.pg.endpoint import Endpoint

Conn = psycopg.Connection[Any]


def read_locked(plan: TablePlan, keys: Sequence[Key], src: Conn, side: Side) -> Rows | None:
    """``keys`` read FOR SHARE, in a savepoint; None when the rows cannot be locked."""
    try:
        with src.transaction():
            return lookup(plan, keys, src, side, lock=True)
    except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected,
            psycopg.errors.ReadOnlySqlTransaction,
            psycopg.errors.InsufficientPrivilege):
        return None


def settle(keys: Iterable[Key], first: Rows, second: Rows, dst: Rows
           ) -> tuple[set[Key], set[Key]]:
    """(persisted, unstable): keys the subscriber holds otherwise than the publisher.

    A key is persisted when the publisher's two reads (``first``, ``second``) agree,
    unstable when its row changed between them.
    """
    persisted: set[Key] = set()
    unstable: set[Key] = set()
    for key in keys:
        a, b, c = first.get(key), second.get(key), dst.get(key)
        same_src = (a.terms if a else None) == (b.terms if b else None)
        equal = (b.terms if b else None) == (c.terms if c else None)
        if equal:
            continue
        (persisted if same_src else unstable).add(key)
    return persisted, unstable


class Confirmer:
    """The last look at a table's candidate keys; one per comparison, sharing its pools."""

    def __init__(self, cfg: ValidateConfig, dbs: dict[Side, Endpoint],
                 pools: dict[Side, SidePool], *, catch_up: Callable[[], None] | None,
                 publisher: Side) -> None:
        self.cfg = cfg
        self.dbs = dbs
        self.pools = pools
        self.catch_up = catch_up
        self.publisher: Side = publisher
        self._source: Conn | None = None

    def close(self) -> None:
        if self._source is not None:
            self._source.close()

    def confirm(self, plan: TablePlan, candidates: set[Key], result: TableResult) -> None:
        """Look every candidate key up again on both sides; keep what really differs."""
        if not candidates:
            return
        keys = sorted(candidates, key=key_sort)[: self.cfg.max_diff_keys]
        if self.catch_up is None:
            fb = self.pools["blue"].submit(partial(lookup, plan, keys, side="blue"))
            fg = self.pools["green"].submit(partial(lookup, plan, keys, side="green"))
            result.diffs = diff_rows(plan, fb.result(), fg.result(), keys)
            result.transient = len(keys) - len(result.diffs)
            return
        first_keys = len(keys)
        unstable: set[Key] = set()
        diffs: list[RowDiff] = []
        for round_no in range(self.cfg.recheck_rounds):
            self.catch_up()  # short lag before taking any lock
            persisted, unstable, blue_rows, green_rows, exact = self._round(plan, keys)
            diffs = diff_rows(plan, blue_rows, green_rows, persisted)
            keys = sorted(persisted | unstable, key=key_sort)
            # Rows locked on the publisher were compared exactly; rows it does not hold
            # (extra on green) cannot be locked, so they must differ in two rounds.
            if not keys or (not unstable and (exact or round_no >= 1)):
                break
        result.diffs = diffs
        result.unconfirmed = len(unstable)
        result.transient = first_keys - len(diffs) - len(unstable)

    def _source_conn(self) -> Conn:
        if self._source is None or self._source.closed:
            self._source = open_session(self.dbs[self.publisher], self.cfg, "validate-confirm")
            self._source.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        return self._source

    def _round(self, plan: TablePlan, keys: list[Key]
               ) -> tuple[set[Key], set[Key], Rows, Rows, bool]:
        """One exact look at ``keys`` while replication streams.

        On the publisher, in one transaction: lock the rows (FOR SHARE: writers to
        them wait, nobody else does) and read them; catch up, so the subscriber has
        applied every commit before the lock, including the last one touching these
        rows; read the subscriber; read the publisher again. A locked row cannot have
        changed, so publisher and subscriber are compared at the same point. A key
        the publisher does not hold cannot be locked: it counts as stable only if
        both publisher reads agree.
        """
        assert self.catch_up is not None
        src_side: Side = self.publisher
        dst_side: Side = "green" if src_side == "blue" else "blue"
        src = self._source_conn()
        with src.transaction():
            held = read_locked(plan, keys, src, src_side) if self.cfg.lock_rows else None
            locked = held is not None
            first = held if held is not None else lookup(plan, keys, src, src_side)
            self.catch_up()
            other = self.pools[dst_side].submit(
                partial(lookup, plan, keys, side=dst_side))
            dst = other.result()
            second = lookup(plan, keys, src, src_side)
        persisted, unstable = settle(keys, first, second, dst)
        blue_rows, green_rows = (second, dst) if src_side == "blue" else (dst, second)
        exact = locked and all(k in first for k in persisted)
        return persisted, unstable, blue_rows, green_rows, exact
