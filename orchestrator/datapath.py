"""The data path between blue and green: the two logical replication directions of
one release, and every step that moves, checks or removes them.

- forward (blue -> green): built by ``sync`` (with the initial copy), dropped at
  promotion (or at the switchover when the reverse direction cannot filter origins);
- reverse (green -> blue): started when green first takes writes, and what a
  rollback waits on to bring green's writes back to blue.

The machine decides when; ``ReplicationPair`` knows how, and records what it did
through the release's journal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from orchestrator.context import ReleaseContext
from orchestrator.errors import OrchestrateError, ReleaseFailed
from orchestrator.events import Kind
from orchestrator.pg import catalog, fence, initial_copy, matviews, replication, sequences
from orchestrator.pg.conn import server_major
from orchestrator.pg.tools import find_tools
from orchestrator.record import Status
from orchestrator.routers.base import Weights
from orchestrator.store import ReleaseRow


@dataclass(frozen=True)
class Lag:
    """One direction's lag: WAL not confirmed (bytes) and replay delay (seconds);
    None where the publisher could not say (the slot not streamed)."""

    direction: str
    bytes: int | None
    seconds: float | None
    confirmed: str | None = None  # the slot's confirmed_flush_lsn


@dataclass
class ReplicationCheck:
    """What one data-path check found (see ``ReplicationPair.health``)."""

    problem: str | None = None
    postponed: str = ""  # could not look: why
    lags: list[Lag] = field(default_factory=list)


class ReplicationPair:
    def __init__(self, ctx: ReleaseContext) -> None:
        self.ctx = ctx
        self.fwd = replication.forward(ctx.name)
        self.rev = replication.reverse(ctx.name)
        # Worker errors of each subscription when a stage's first check saw it.
        self._apply_errors: dict[tuple[int, str], int] = {}

    # ---------------------------------------------------------------- forward

    def build_forward(self) -> None:
        """Green caught up and indexed: snapshot-consistent parallel copy (or the
        subscription's own initial sync), post-data rebuilt, streaming from the slot."""
        ctx, sync = self.ctx, self.ctx.cfg.sync
        with ctx.blue() as blue, ctx.green() as green:
            tables = ctx.tables(blue)
            tools = find_tools(server_major(blue), ctx.cfg.tools.pg_bindir,
                               target_major=server_major(green))
            ctx.record_blue_schema(blue)
            # Found now, not when green is about to take writes.
            replication.reverse_column_lists(green, tables, ctx.tables(green))
        labels = {"copy": "initial copy (bytes)", "post-data": "indexes and constraints"}
        report = initial_copy.initial_sync(
            ctx.blue_endpoint, ctx.green_endpoint, tables, names=self.fwd, tools=tools,
            control_schema=ctx.schema, config=sync.initial_copy,
            origin_none=ctx.facts.mode == "bidirectional",
            copy_timeout=sync.initial_copy_timeout,
            catchup_timeout=sync.catchup_timeout, poll=sync.poll_interval,
            progress=lambda phase, done, total: ctx.display.progress(
                phase, labels.get(phase, phase), done, total))
        for phase in labels:
            ctx.display.finish(phase)
        summary = report.as_dict()
        ctx.fact(sync=summary)
        rows = (summary.get("copy") or {}).get("rows")
        if isinstance(rows, int):  # the subscription's own initial sync counts none
            ctx.journal.emit(Kind.MEASUREMENT, state="sync", details={
                "check": "initial-copy:rows", "value": rows, "baseline": None,
                "verdict": "pass"})
        ctx.note("green caught up and indexed",
                 **{k: v for k, v in summary.items() if k.endswith("_s")})

    def refresh_matviews(self) -> None:
        """Replication does not carry their contents: fill them from the copied rows."""
        ctx = self.ctx
        with ctx.blue() as blue, ctx.green() as green:
            on_blue = {m.qualified for m in matviews.matviews(blue, exclude_schemas=(
                ctx.schema,)) if m.populated}
            done = matviews.refresh_all(green, exclude_schemas=(ctx.schema,),
                                        populated_on_blue=on_blue,
                                        timeout=ctx.cfg.sync.initial_copy_timeout)
        if done:
            ctx.fact(matviews_refreshed=[d.as_dict() for d in done])
            ctx.note("materialized views refreshed on green", count=len(done))

    # ----------------------------------------------------------- green writes

    def open_green_for_writes(self, *, next_weight: int) -> None:
        """Before the first request reaches green's application."""
        ctx = self.ctx
        margin = ctx.cfg.sync.sequence_margin
        if ctx.facts.mode == "bidirectional":
            with ctx.blue() as blue, ctx.green() as green:
                moves = sequences.sync_past(blue, green, margin=margin,
                                            exclude_schemas=(ctx.schema,))
                self.start_reverse(blue, green)
            ctx.note("green opened for writes; its changes flow back to blue",
                     sequences_moved=sum(1 for m in moves if m.moved))
        elif next_weight == 100 or not ctx.cfg.sync.accept_write_loss_risk:
            self.switchover()
        else:
            with ctx.blue() as blue, ctx.green() as green:
                sequences.sync_past(blue, green, margin=margin, exclude_schemas=(ctx.schema,))
            ctx.note("green takes writes WITHOUT replication back to blue (accepted in "
                     "config): a rollback will not carry them to blue", "warning")
        ctx.fact(green_writable=True)

    def switchover(self) -> None:
        """Fence blue, let green apply blue's last commit, move sequences, and start the
        reverse direction. The write pause lasts from the fence to the router change."""
        ctx = self.ctx
        if ctx.facts.switched_over:
            return
        started = time.monotonic()
        with ctx.blue() as blue, ctx.green() as green:
            ctx.verify_blue_schema(blue, "before the switchover")
            if ctx.cfg.blue.app_role:
                # Recorded before the fence: a failure at any later step (or a crash)
                # rolls back with blue unfenced.
                ctx.fact(blue_fenced=True)
                fence.fence(blue, ctx.cfg.blue.app_role)
            if replication.ensure_enabled(green, self.fwd.subscription):
                ctx.note("forward subscription was disabled; enabled again to catch up",
                         "warning")
            waited = self._wait_forward(blue, green)
            sequences.sync_past(blue, green, margin=ctx.cfg.sync.sequence_margin,
                                exclude_schemas=(ctx.schema,))
            if ctx.facts.mode != "bidirectional":
                # Without origin filtering the forward direction must be gone before the
                # reverse one starts, or changes would loop.
                replication.drop_subscription(green, self.fwd.subscription)
                replication.drop_slot(blue, self.fwd.slot)
                ctx.fact(forward_dropped=True)
            self.start_reverse(blue, green)
            # Before the router moves: a crash between the two must roll back as if
            # green took writes (the reverse path brings them to blue).
            ctx.fact(green_writable=True)
        ctx.set_weights(Weights.green_at(100))
        pause = time.monotonic() - started
        ctx.fact(switched_over=True, green_writable=True, switchover_pause_s=round(pause, 3))
        ctx.note("switchover done: blue fenced, green caught up and taking writes",
                 write_pause_s=round(pause, 3), catchup_s=round(waited, 3),
                 fenced=bool(ctx.cfg.blue.app_role))

    def start_reverse(self, blue: psycopg.Connection[Any], green: psycopg.Connection[Any]
                      ) -> None:
        """Green -> blue, only the columns blue has (green may have new ones)."""
        ctx = self.ctx
        blue_tables = {t.qname: t for t in ctx.tables(blue)}
        green_tables = [t for t in ctx.tables(green) if t.qname in blue_tables]
        columns = replication.reverse_column_lists(green, list(blue_tables.values()),
                                                   green_tables)
        heartbeat = catalog.Table(ctx.schema, replication.HEARTBEAT_TABLE, ["direction"])
        replication.ensure_publication(green, self.rev.publication, [*green_tables, heartbeat],
                                       columns)
        opts = replication.SubscriptionOptions(
            copy_data=False, origin_none=ctx.facts.mode == "bidirectional",
            binary=min((ctx.facts.majors or {}).values() or [0]) >= 16)
        replication.ensure_subscription(blue, self.rev.subscription,
                                        ctx.green_endpoint.peer_conninfo(),
                                        self.rev.publication, opts)
        # Proves the reverse path works end to end before anyone depends on it.
        self._wait_reverse(blue, green)

    def catch_up(self, blue: psycopg.Connection[Any], green: psycopg.Connection[Any]
                 ) -> float:
        """Wait until the subscriber applied the publisher's last commit, in the
        direction the live subscriptions say: forward until it is dropped, then
        reverse."""
        if self.ctx.facts.forward_dropped:
            return self._wait_reverse(blue, green)
        return self._wait_forward(blue, green)

    def _wait_forward(self, blue: psycopg.Connection[Any], green: psycopg.Connection[Any]
                      ) -> float:
        return replication.wait_applied(
            blue, green, schema=self.ctx.schema, direction="fwd",
            subscription=self.fwd.subscription, timeout=self.ctx.cfg.sync.catchup_timeout)

    def _wait_reverse(self, blue: psycopg.Connection[Any], green: psycopg.Connection[Any]
                      ) -> float:
        return replication.wait_applied(
            green, blue, schema=self.ctx.schema, direction="rev",
            subscription=self.rev.subscription, timeout=self.ctx.cfg.sync.catchup_timeout)

    def settle_to_blue(self, blue: psycopg.Connection[Any],
                       green: psycopg.Connection[Any]) -> None:
        """Fence green, wait until blue applied green's last commit, move blue's
        sequences past green's."""
        ctx = self.ctx
        if ctx.cfg.green.app_role:
            ended = fence.fence(green, ctx.cfg.green.app_role)
            ctx.note("green fenced", sessions_ended=ended)
        if replication.subscription_exists(blue, self.rev.subscription):
            if replication.ensure_enabled(blue, self.rev.subscription):
                ctx.note("reverse subscription was disabled; enabled again to bring "
                         "green's writes to blue", "warning")
            waited = self._wait_reverse(blue, green)
            ctx.note("blue has every write green committed", catchup_s=round(waited, 3))
        else:
            ctx.note("green took writes without reverse replication (risk accepted in the "
                     "config): writes made on green are not on blue", "critical")
        moves = sequences.sync_past(green, blue, margin=ctx.cfg.sync.sequence_margin,
                                    exclude_schemas=(ctx.schema,))
        ctx.note("blue's sequences moved past green's", moved=sum(1 for m in moves if m.moved))

    # ------------------------------------------------------------------ health

    def health(self, index: int) -> ReplicationCheck:
        """Both subscriptions applying, and how far behind each is. Runs on a worker
        thread with connections of its own; touches neither the store nor the facts
        it does not read."""
        deadline = self.ctx.cfg.canary.probe.timeout
        try:
            blue = self.ctx.blue(attempts=1, deadline=deadline)
            green = self.ctx.green(attempts=1, deadline=deadline)
        except OrchestrateError as exc:
            return ReplicationCheck(postponed=exc.message)
        result = ReplicationCheck()
        try:
            with blue, green:
                paths = []
                if not self.ctx.facts.forward_dropped:
                    paths.append(("forward", green, self.fwd.subscription, blue, self.fwd.slot))
                if replication.subscription_exists(blue, self.rev.subscription):
                    paths.append(("reverse", blue, self.rev.subscription, green, self.rev.slot))
                for what, sub, subscription, pub, slot in paths:
                    before = self._apply_errors.setdefault(
                        (index, subscription), replication.error_count(sub, subscription))
                    try:
                        replication.check_healthy(sub, subscription, errors_before=before)
                    except ReleaseFailed as exc:
                        result.problem = f"{what} replication stopped: {exc.message}"
                        return result
                    seconds, confirmed = replication.lag_seconds(pub, slot)
                    result.lags.append(Lag(what, replication.lag_bytes(pub, slot), seconds,
                                           confirmed))
        except psycopg.OperationalError as exc:
            # The server stopped answering mid-check: the probes judge that.
            return ReplicationCheck(postponed=str(exc).strip())
        return result

    # ---------------------------------------------------------------- removal

    def drop_forward(self) -> None:
        with self.ctx.blue() as blue, self.ctx.green() as green:
            replication.drop_subscription(green, self.fwd.subscription)
            replication.drop_publication(blue, self.fwd.publication)
            replication.drop_slot(blue, self.fwd.slot)

    def drop_all(self, blue: psycopg.Connection[Any],
                 green: psycopg.Connection[Any] | None) -> None:
        if green is not None:
            replication.drop_subscription(green, self.fwd.subscription)
        replication.drop_subscription(blue, self.rev.subscription)
        replication.drop_publication(blue, self.fwd.publication)
        replication.drop_slot(blue, self.fwd.slot)
        if green is not None:
            replication.drop_publication(green, self.rev.publication)
            replication.drop_slot(green, self.rev.slot)
            # The subscription path raises green's sync-worker settings for the run;
            # put them back even when the run that raised them crashed.
            initial_copy.restore_sync_settings(green, control_schema=self.ctx.schema)

    def drop_green_database(self) -> None:
        from psycopg import sql

        with self.ctx.green(dbname="postgres") as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(self.ctx.cfg.green.dbname)))
        self.ctx.note("green database dropped")

    def drop_leftovers(self) -> None:
        """Slots of finished or abandoned releases make the server keep WAL forever."""
        for end in (self.ctx.blue_endpoint, self.ctx.green_endpoint):
            role = end.role
            try:
                conn = end.connect(attempts=1)
            except OrchestrateError:
                continue  # green's database may not exist yet
            with conn:
                for slot in replication.orchestrate_slots(conn):
                    if slot.name in {self.fwd.slot, self.rev.slot}:
                        continue
                    owner = self._slot_release(slot.name)
                    if owner is not None and owner.status == Status.RUNNING:
                        continue
                    replication.drop_slot(conn, slot.name)
                    self.ctx.note(f"dropped leftover replication slot {slot.name} on {role}",
                                  "warning", retained_bytes=slot.retained_bytes)

    def _slot_release(self, slot: str) -> ReleaseRow | None:
        # Slot names cannot always be turned back into release names (replication.Names
        # hashes some): compare with the names of the release that may be running.
        other = self.ctx.store.active_other_than(self.ctx.name)
        if other is not None and slot in {replication.forward(other.name).slot,
                                          replication.reverse(other.name).slot}:
            return other
        return None
