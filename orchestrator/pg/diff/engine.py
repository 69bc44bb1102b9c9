"""The engine of a comparison: chunking, both sides in parallel, bisection, confirming.

``Comparer.run`` walks every table through the phases in step, so that both sides'
workers stay busy: first-level chunks from a key sample, their checksums (and,
under writes, re-checks after a catch-up), bisection of the mismatching ones down
to rows, and a last look at every differing key (``_confirm``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import psycopg

from orchestrator.config import ValidateConfig
from orchestrator.pg.columns import Side
from orchestrator.pg.diff.confirm import Confirmer
from orchestrator.pg.diff.queries import (
    Key,
    KeyRange,
    TablePlan,
    integer_key,
    integer_points,
    pick_bounds,
    ranges_between,
)
from orchestrator.pg.diff.rows import (
    ChunkSum,
    Rows,
    TableResult,
    diff_rows,
    fetch_range,
    hash_counts,
    rows_by_hash,
    whole_table_diffs,
)
from orchestrator.pg.diff.sides import (
    SidePool,
    bucket_sums,
    checksum,
    key_ends,
    sample_keys,
    split_points,
)
from orchestrator.pg.endpoint import Endpoint, EndpointLike

T = TypeVar("T")
Conn = psycopg.Connection[Any]
Progress = Callable[[str, int, int], None]

# A bisection deeper than this means the data moves faster than it can be narrowed.
_MAX_DEPTH = 40


@dataclass
class _Chunk:
    rng: KeyRange
    blue: ChunkSum | None = None
    green: ChunkSum | None = None

    @property
    def matches(self) -> bool:
        return self.blue == self.green


@dataclass
class _State:
    plan: TablePlan
    result: TableResult
    chunks: list[_Chunk] = field(default_factory=list)
    candidates: set[Key] = field(default_factory=set)
    unresolved: int = 0  # leaves whose checksums differed but whose rows did not
    int_bounds: tuple[int, int] | None = None  # smallest and largest key, integer keys
    started: float = field(default_factory=time.monotonic)

    @property
    def failed(self) -> bool:
        return self.result.error is not None


@dataclass
class _Work:
    state: _State
    rng: KeyRange
    blue_rows: int
    green_rows: int
    depth: int = 0



# Cut-point queries of one bisection level, and the row fetches of its small ranges.
_Split = tuple[_Work, Future[list[Key]]]
_Leaf = tuple[_Work, Future[Rows], Future[Rows]]


@dataclass
class _Level:
    splits: list[_Split] = field(default_factory=list)
    leaves: list[_Leaf] = field(default_factory=list)


class Comparer:
    """Compares the rows of many tables; one instance per validation."""

    def __init__(self, blue_db: EndpointLike, green_db: EndpointLike,
                 cfg: ValidateConfig, *, catch_up: Callable[[], None] | None = None,
                 publisher: Side = "blue", progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.dbs: dict[Side, Endpoint] = {"blue": Endpoint.of(blue_db, "blue"),
                                          "green": Endpoint.of(green_db, "green")}
        self.catch_up = catch_up
        self.publisher: Side = publisher
        self.progress = progress
        self.pools = {side: SidePool(side, db, cfg) for side, db in self.dbs.items()}
        self._confirmer = Confirmer(cfg, self.dbs, self.pools, catch_up=catch_up,
                                    publisher=publisher)
        self.counts_only = not cfg.checksums
        self.leaf_limit = cfg.leaf_rows * 4 + 64

    # -- plumbing ----------------------------------------------------------

    def close(self, *, abort: bool = False) -> None:
        for pool in self.pools.values():
            pool.close(abort=abort)
        self._confirmer.close()

    def _both(self, fn: Callable[[Conn, Side], T]) -> tuple[Future[T], Future[T]]:
        return (self.pools["blue"].submit(lambda c: fn(c, "blue")),
                self.pools["green"].submit(lambda c: fn(c, "green")))

    def _fail(self, state: _State, exc: BaseException) -> None:
        if state.result.error is None:
            state.result.error = f"{type(exc).__name__}: {str(exc).strip()}"

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    # -- the phases --------------------------------------------------------

    def run(self, plans: list[TablePlan]) -> list[TableResult]:
        states = [_State(p, TableResult(
            p.table.display, method="counts" if self.counts_only else
            ("chunked" if p.chunked else "whole-table"),
            compared_columns=[c.label for c in p.columns], green_only_columns=p.green_only))
            for p in plans]
        self._plan_chunks(states)
        if self.catch_up is not None:
            # Green holds at least everything blue committed before we start.
            self.catch_up()
        self._checksum_chunks(states)
        if self.catch_up is not None:
            self._recheck_chunks(states)
        if not self.counts_only:
            self._bisect(states)
            self._name_rows(states)
        for state in states:
            self._finish(state)
        return [s.result for s in states]

    def _name_rows(self, states: list[_State]) -> None:
        """The differing rows of every table that still differs after the bisection."""
        for state in states:
            if state.failed:
                continue
            try:
                if state.plan.chunked:
                    self._confirm(state)
                elif any(not c.matches for c in state.chunks):
                    self._diff_whole_table(state)
            except psycopg.Error as exc:
                self._fail(state, exc)

    def _plan_chunks(self, states: list[_State]) -> None:
        """First-level ranges of every table, from a sample of blue's keys."""
        futures = self._sample_chunks(states)
        ends = [(s, *self._both(partial(key_ends, s.plan))) for s in states
                if integer_key(s.plan) and not self.counts_only]
        self._cut_chunks(futures)
        for state, fb, fg in ends:
            try:
                found = [x for x in (fb.result(), fg.result()) if x is not None]
            except psycopg.Error:
                continue
            if found:
                state.int_bounds = (min(x[0] for x in found), max(x[1] for x in found))

    def _sample_chunks(self, states: list[_State]) -> list[tuple[_State, int, Future[list[Key]]]]:
        """One range for small tables; for the others, a key sample under way."""
        futures: list[tuple[_State, int, Future[list[Key]]]] = []
        for state in states:
            plan = state.plan
            chunks = max(1, math.ceil(plan.est_rows / self.cfg.chunk_rows))
            if not plan.chunked or chunks == 1 or self.counts_only:
                state.chunks = [_Chunk(KeyRange())]
                continue
            futures.append((state, chunks, self.pools["blue"].submit(
                partial(sample_keys, plan, chunks))))
        return futures

    def _cut_chunks(self, futures: list[tuple[_State, int, Future[list[Key]]]]) -> None:
        for state, chunks, fut in futures:
            try:
                bounds = pick_bounds(fut.result(), chunks)
            except psycopg.Error:
                # Sampling is an optimisation: one range is slower, never wrong.
                bounds = []
            state.chunks = [_Chunk(r) for r in ranges_between(None, None, bounds)]

    def _compare_chunks(self, items: list[tuple[_State, _Chunk]], phase: str) -> None:
        futures = []
        for state, chunk in items:
            fb, fg = self._both(partial(checksum, state.plan, chunk.rng,
                                        strong=self.cfg.strong_checksums,
                                        counts_only=self.counts_only))
            futures.append((state, chunk, fb, fg))
        for done, (state, chunk, fb, fg) in enumerate(futures, 1):
            try:
                chunk.blue, chunk.green = fb.result(), fg.result()
            except psycopg.Error as exc:
                self._fail(state, exc)
            state.result.ranges_compared += 1
            self._report(phase, done, len(futures))

    def _checksum_chunks(self, states: list[_State]) -> None:
        self._compare_chunks([(s, c) for s in states for c in s.chunks], "checksums")

    def _recheck_chunks(self, states: list[_State]) -> None:
        """Under writes: compare mismatching chunks again after green caught up.

        A chunk touched by a transaction that blue had committed and green had not
        yet applied differs for a moment; a real difference stays.
        """
        assert self.catch_up is not None
        for _ in range(self.cfg.recheck_rounds):
            bad = [(s, c) for s in states if not s.failed for c in s.chunks if not c.matches]
            if not bad:
                return
            self.catch_up()
            self._compare_chunks(bad, "re-checks")

    def _bisect(self, states: list[_State]) -> None:
        """Narrow every mismatching chunk of a keyed table down to differing keys.

        Level by level over all tables at once, so both sides' workers stay busy.
        """
        pending: list[_Work] = []
        for s in states:
            if s.failed or not s.plan.chunked:
                continue
            for c in s.chunks:
                if not c.matches and c.blue is not None and c.green is not None:
                    pending.append(_Work(s, c.rng, c.blue.rows, c.green.rows))
        while pending:
            pending = self._collect_level(self._plan_level(pending))

    def _plan_level(self, pending: list[_Work]) -> _Level:
        """Start one level's queries: cut points of big ranges, then rows of small ones."""
        cap = self.cfg.max_diff_keys
        level = _Level()
        leaves: list[_Work] = []
        for w in pending:
            if w.state.failed:
                continue
            if len(w.state.candidates) >= cap:
                w.state.result.complete = False
                continue
            if max(w.blue_rows, w.green_rows) <= self.cfg.leaf_rows or w.depth >= _MAX_DEPTH:
                leaves.append(w)
            else:
                level.splits.append((w, self._start_split(w)))
        level.leaves = [(w, *self._both(partial(fetch_range, w.state.plan, w.rng,
                                                self.leaf_limit + 1)))
                        for w in leaves]
        return level

    def _start_split(self, w: _Work) -> Future[list[Key]]:
        rows = max(w.blue_rows, w.green_rows)
        # Enough parts that each should hold at most leaf_rows rows: one
        # step usually goes straight from a chunk to rows.
        fanout = max(2, min(self.cfg.split_factor, math.ceil(rows / self.cfg.leaf_rows)))
        points = self._integer_split(w.state, w.rng, fanout)
        if points is not None:
            done: Future[list[Key]] = Future()
            done.set_result(points)
            return done
        side: Side = "blue" if w.blue_rows >= w.green_rows else "green"
        return self.pools[side].submit(partial(
            split_points, w.state.plan, w.rng, math.ceil(rows / fanout), side=side))

    def _collect_level(self, level: _Level) -> list[_Work]:
        """Wait for one level's queries; what still differs is the next level."""
        nxt: list[_Work] = []
        parts = self._cut_ranges(level.splits, nxt)
        self._compare_parts(parts, nxt)
        self._compare_leaves(level.leaves, nxt)
        return nxt

    def _cut_ranges(self, splits: list[tuple[_Work, Future[list[Key]]]], nxt: list[_Work]
                    ) -> list[tuple[_Work, list[KeyRange], Future[list[ChunkSum]],
                                    Future[list[ChunkSum]]]]:
        """Checksums of the parts of every range whose cut points arrived."""
        parts: list[tuple[_Work, list[KeyRange], Future[list[ChunkSum]],
                          Future[list[ChunkSum]]]] = []
        for w, fut in splits:
            try:
                points = fut.result()
            except psycopg.Error as exc:
                self._fail(w.state, exc)
                continue
            if not points:
                # The range shrank under writes: fetch what is there.
                nxt.append(_Work(w.state, w.rng, 0, 0, w.depth + 1))
                continue
            ranges = ranges_between(w.rng.lo, w.rng.hi, points)
            parts.append((w, ranges, *self._both(partial(
                bucket_sums, w.state.plan, w.rng, points, strong=self.cfg.strong_checksums))))
        return parts

    def _compare_parts(self, parts: list[tuple[_Work, list[KeyRange], Future[list[ChunkSum]],
                                               Future[list[ChunkSum]]]],
                       nxt: list[_Work]) -> None:
        for w, ranges, fb, fg in parts:
            try:
                bs, gs = fb.result(), fg.result()
            except psycopg.Error as exc:
                self._fail(w.state, exc)
                continue
            w.state.result.ranges_compared += len(ranges)
            for rng, b, g in zip(ranges, bs, gs, strict=True):
                if b != g:
                    nxt.append(_Work(w.state, rng, b.rows, g.rows, w.depth + 1))

    def _compare_leaves(self, leaves: list[tuple[_Work, Future[Rows], Future[Rows]]],
                        nxt: list[_Work]) -> None:
        """Rows of the small ranges, compared by key: candidates for ``_confirm``."""
        for w, fb_rows, fg_rows in leaves:
            try:
                b_rows, g_rows = fb_rows.result(), fg_rows.result()
            except psycopg.Error as exc:
                self._fail(w.state, exc)
                continue
            if max(len(b_rows), len(g_rows)) > self.leaf_limit:
                if w.depth >= _MAX_DEPTH:
                    w.state.result.complete = False
                else:
                    nxt.append(_Work(w.state, w.rng, len(b_rows), len(g_rows), w.depth + 1))
                continue
            found = diff_rows(w.state.plan, b_rows, g_rows)
            if not found:
                w.state.unresolved += 1
            for d in found:
                w.state.candidates.add(tuple(d.key.values()))

    def _integer_split(self, state: _State, rng: KeyRange, parts: int) -> list[Key] | None:
        """Points for a single integer key, computed instead of read (saves a round trip).

        Open ends use the smallest and largest keys seen on either side; the outer
        parts stay open, so a row beyond them is still counted. Sparse keys give
        unequal parts, which the next step splits again.
        """
        bounds = state.int_bounds
        if bounds is None:
            return None
        lo = int(rng.lo[0]) if rng.lo is not None else bounds[0]
        hi = int(rng.hi[0]) if rng.hi is not None else bounds[1] + 1
        points = integer_points(lo, hi, parts)
        return points or None

    # -- confirming differences -------------------------------------------

    def _confirm(self, state: _State) -> None:
        """Look every candidate key up again on both sides; keep what really differs."""
        self._confirmer.confirm(state.plan, state.candidates, state.result)

    # -- tables without a key ------------------------------------------------

    def _diff_whole_table(self, state: _State) -> None:
        """A table without a key, compared as a multiset of row hashes."""
        plan = state.plan
        rows = max((max(c.blue.rows if c.blue else 0, c.green.rows if c.green else 0)
                    for c in state.chunks), default=0)
        if rows > self.cfg.nokey_diff_max_rows:
            state.result.unexplained = (
                f"content differs; the table has no primary key and {rows} rows (more than "
                "validate.nokey_diff_max_rows), so the differing rows are not listed")
            return
        if self.catch_up is not None:
            self.catch_up()
        fb, fg = self._both(partial(hash_counts, plan))
        b, g = fb.result(), fg.result()
        extra_blue = b - g
        extra_green = g - b
        wanted = list(extra_blue) + list(extra_green)
        wanted = wanted[: self.cfg.max_diff_keys]
        if not wanted:
            return
        fb2, fg2 = self._both(partial(rows_by_hash, plan, wanted))
        b_rows, g_rows = fb2.result(), fg2.result()
        diffs = whole_table_diffs(plan, wanted, extra_blue, extra_green, b_rows, g_rows)
        state.result.diffs = diffs
        state.result.complete = len(wanted) == len(extra_blue) + len(extra_green)

    # -- results ---------------------------------------------------------------

    def _finish(self, state: _State) -> None:
        res = state.result
        done = [c for c in state.chunks if c.blue is not None and c.green is not None]
        res.chunks = len(state.chunks)
        res.blue_rows = sum(c.blue.rows for c in done if c.blue is not None)
        res.green_rows = sum(c.green.rows for c in done if c.green is not None)
        res.mismatched_chunks = sum(1 for c in done if not c.matches)
        self._explain(state)
        res.seconds = time.monotonic() - state.started

    def _explain(self, state: _State) -> None:
        """Why checksums differ where no differing row could be named."""
        res = state.result
        if state.unresolved and self.catch_up is None and not res.error:
            # Without writes, a range whose checksums differ holds a differing row; rows
            # that read the same on both sides mean the data moved while we looked.
            res.unexplained = (f"{state.unresolved} range(s) had different checksums but "
                               "identical rows (were there writes? pass a catch-up)")
        if not res.complete and not res.diffs and not res.error and res.unexplained is None:
            res.unexplained = ("too many transient differences to isolate the real ones; "
                               "run the validation again")


def compare_tables(blue_db: EndpointLike, green_db: EndpointLike,
                   cfg: ValidateConfig,
                   plans: list[TablePlan], *, catch_up: Callable[[], None] | None = None,
                   publisher: Side = "blue", progress: Progress | None = None
                   ) -> list[TableResult]:
    comparer = Comparer(blue_db, green_db, cfg, catch_up=catch_up, publisher=publisher,
                        progress=progress)
    try:
        results = comparer.run(plans)
    except BaseException:
        comparer.close(abort=True)
        raise
    comparer.close()
    return results
