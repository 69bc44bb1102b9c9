"""The release state machine.

    preflight -> backup -> provision -> migrate -> sync -> validate -> canary
      -> promote -> window -> cleanup -> done                  (status: promoted)
    any failure after preflight, an abort or a breached check
      -> rollback -> rolled_back                               (status: rolled_back)

Each state is a method that is safe to run again from its start: the state is
persisted (``StateStore``) before and after, so ``orchestrate release`` run after a
crash (kill -9 included) continues from the state it was in. Facts a state learns
(the backup file, whether green took writes, the weights last set) are persisted
too, and decide what a later state or a rollback has to undo.

Data safety rules the states keep:
- green takes application writes only after its sequences are past blue's, and,
  while blue still takes writes too, only with changes flowing back to blue
  (bidirectional mode, PostgreSQL 16+ on both sides, ``origin = none``);
- where that is impossible (blue older than 16), green takes writes only at the
  switchover (blue fenced, green caught up to blue's last commit), unless the
  operator accepted the risk in the config;
- a rollback after green took writes fences green, waits until blue has every
  change green committed, and moves blue's sequences past green's.

The states are short: the data path is ``orchestrator.datapath``, the canary stages
and the window's watch are ``orchestrator.stages``, both on ``orchestrator.context``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg

from orchestrator import preflight
from orchestrator.canary.metrics import MetricsSource
from orchestrator.config import ReleaseConfig
from orchestrator.context import ReleaseContext
from orchestrator.datapath import ReplicationPair
from orchestrator.errors import (
    OrchestrateError,
    PreflightError,
    ReleaseFailed,
    StateUnavailable,
)
from orchestrator.events import Events, Kind
from orchestrator.interrupts import Stop
from orchestrator.logging import get_logger, scrub
from orchestrator.pg import backup, fence, migrations, schema
from orchestrator.pg import validate as validation
from orchestrator.pg.conn import server_major
from orchestrator.pg.tools import find_tools
from orchestrator.record import (
    AFTER_PROMOTION,
    TERMINAL,
    Facts,
    Outcome,
    Pause,
    State,
    Status,
    config_digest,
)
from orchestrator.routers.base import TrafficRouter
from orchestrator.stages import REQUEST_POLL_S, CanaryFailed, StageRunner
from orchestrator.store import ReleaseRow, StateStore
from orchestrator.ui import Display, NoDisplay

log = get_logger("orchestrate")

# Re-exported: State & co. live in orchestrator.record, the stage names in .stages.
__all__ = ["AFTER_PROMOTION", "REQUEST_POLL_S", "TERMINAL", "CanaryFailed", "Outcome",
           "Pause", "Release", "State", "Status", "config_digest"]


class Release:
    def __init__(
        self,
        cfg: ReleaseConfig,
        *,
        store: StateStore,
        router: TrafficRouter,
        metrics: MetricsSource,
        display: Display | None = None,
        sleep: Callable[[float], None] = time.sleep,
        wait_window: bool = False,
        events: Events | None = None,
        stop: Stop | None = None,
    ) -> None:
        self.wait_window = wait_window
        self.cfg = cfg
        self.name = cfg.release.name
        self.store = store
        self.router = router
        self.metrics = metrics
        self.display = display or NoDisplay()
        self.sleep = sleep
        self.schema = cfg.state.schema_name
        self.ctx = ReleaseContext(cfg, store, router, metrics, sleep=sleep, display=self.display,
                                  events=events or Events(), stop=stop or Stop())
        self.emit = self.ctx.journal.emit
        self.pair = ReplicationPair(self.ctx)
        self.stages = StageRunner(self.ctx, self.pair)
        self.fwd = self.pair.fwd
        self.rev = self.pair.rev
        self._handlers: dict[State, Callable[[], State | Pause]] = {
            State.BACKUP: self.backup,
            State.PROVISION: self.provision,
            State.MIGRATE: self.migrate,
            State.SYNC: self.sync,
            State.VALIDATE: self.validate,
            State.CANARY: self.canary,
            State.PROMOTE: self.promote,
            State.WINDOW: self.window,
            State.CLEANUP: self.cleanup,
            State.ROLLBACK: self.rollback,
        }

    # ------------------------------------------------------------------ driver

    def run(self, *, rollback: str | None = None) -> Outcome:
        """Run (or resume) the release until it ends or stops in a state that needs a
        person. With ``rollback`` (a reason), roll it back instead."""
        self.store.acquire_lock()
        try:
            row = self.store.get(self.name)
            if row is None:
                if rollback:
                    raise OrchestrateError(f"release {self.name} has not started; nothing to "
                                           "roll back")
                row = self._start()
            elif row.state in TERMINAL:
                if rollback and row.state != State.ROLLED_BACK:
                    raise OrchestrateError(
                        f"release {self.name} is {row.state}: past its rollback window, "
                        "nothing to roll back",
                        hint="roll forward with a new release instead")
                return self._outcome(row)
            else:
                self._resume_checks(row)
            self.facts = row.facts
            state = row.state
            if rollback:
                state = self._enter_rollback(state, rollback)
            return self._drive(state)
        finally:
            self.store.release_lock()
            self.display.close()
            self.ctx.events.close()

    def _start(self) -> ReleaseRow:
        sha, data = config_digest(self.cfg)
        active = self.store.active_other_than(self.name)
        if active is not None:
            raise PreflightError(
                f"release {active.name} is still {active.state} on this database",
                hint=f"finish it (`orchestrate release` with its config) or roll it back "
                f"(`orchestrate rollback --release {active.name}`) before starting another")
        report = preflight.run(self.cfg, router=self.router, metrics=self.metrics, fresh=True)
        for warning in report.warnings:
            log.warning("preflight", warning=warning)
        report.raise_if_failed()
        # Nothing was written before this point: a failed preflight changes nothing.
        self.store.ensure_schema()
        self.store.create(self.name, State.BACKUP, sha, data)
        self.store.log(self.name, "info", "preflight passed", state=State.PREFLIGHT,
                       details={"mode": report.mode, "warnings": report.warnings,
                                "server_majors": report.majors})
        self.store.merge_facts(self.name, mode=report.mode, majors=report.majors)
        self.emit(Kind.STARTED, state=State.BACKUP.value, details={"mode": report.mode})
        self.pair.drop_leftovers()
        row = self.store.get(self.name)
        assert row is not None
        return row

    def _resume_checks(self, row: ReleaseRow) -> None:
        sha, _ = config_digest(self.cfg)
        if sha != row.config_sha256:
            raise PreflightError(
                f"the configuration changed since release {self.name} started",
                hint="resume with the same config file, or roll the release back first")
        self.store.claim(self.name)
        self.store.log(self.name, "info", f"resuming in state {row.state}", state=row.state)
        log.info("resuming release", release=self.name, state=row.state)

    def _drive(self, state: State) -> Outcome:
        while state not in TERMINAL:
            row = self.store.get(self.name)
            assert row is not None
            # A request made while promoted (the window) is honoured too; only cleanup
            # (past the window) and the rollback itself ignore it. A stop (signal,
            # deadline) too, during the canary: orchestrator.interrupts.
            requested = row.rollback_requested or self.ctx.stop.at(state)
            if requested and state not in {State.ROLLBACK, State.CLEANUP}:
                state = self._enter_rollback(state, requested)
            handler = self._handlers[state]
            started = time.monotonic()
            log.info("state", release=self.name, state=state.value)
            limit = self.ctx.stop.limit  # the metrics' past-the-deadline alert reads it
            self.emit(Kind.STATE, state=state.value,
                      details={"deadline_at": limit.at} if limit is not None else {})
            try:
                following = handler()
            except StateUnavailable as lost:
                # Nothing can be recorded, so nothing is decided: no rollback starts
                # on a side we cannot even write the decision to. The rerun resumes.
                log.error("state database lost", release=self.name,  # noqa: TRY400
                          state=state.value,
                          error=lost.message)
                self.emit(Kind.FAILED, state=state.value, reason=lost.message)
                raise
            except OrchestrateError as exc:
                state = self._on_failure(state, exc)
                continue
            except (psycopg.Error, OSError) as exc:
                state = self._on_failure(state, ReleaseFailed(scrub(str(exc)).strip()))
                continue
            if isinstance(following, Pause):
                self.ctx.note(following.message)
                break
            elapsed = time.monotonic() - started
            self.store.log(self.name, "info", f"{state.value} done", state=state.value,
                           duration_s=elapsed)
            status = {State.WINDOW: Status.PROMOTED, State.DONE: Status.PROMOTED,
                      State.ROLLED_BACK: Status.ROLLED_BACK}.get(following)
            self.store.set_state(self.name, following, status=status, clear_error=False)
            self._emit_transition(state, following, elapsed)
            state = following
        row = self.store.get(self.name)
        assert row is not None
        return self._outcome(row)

    def _on_failure(self, state: State, exc: OrchestrateError) -> State:
        message = exc.message
        log.error("state failed", release=self.name, state=state.value, error=message,
                  hint=exc.hint)
        self.store.log(self.name, "error", message, state=state.value,
                       details={"hint": exc.hint, "kind": type(exc).__name__})
        if state == State.ROLLBACK or state in AFTER_PROMOTION:
            # A failed rollback or cleanup is retried by running the command again;
            # it must not start another rollback on top of itself.
            self.store.set_state(self.name, state, error=message)
            self.emit(Kind.FAILED, state=state.value, reason=message)
            raise ReleaseFailed(
                f"{state.value} did not complete: {message}",
                hint=exc.hint or f"fix the cause and run `orchestrate "
                f"{'rollback' if state == State.ROLLBACK else 'release'}` again; every step "
                "is safe to repeat") from exc
        return self._enter_rollback(state, f"{state.value} failed: {message}")

    def _enter_rollback(self, state: State, reason: str) -> State:
        if state in TERMINAL:
            return state
        if state == State.ROLLBACK:
            return state
        if state == State.CLEANUP:
            raise OrchestrateError(
                f"release {self.name} is past its rollback window (cleanup started)",
                hint="roll forward with a new release instead")
        self.ctx.fact(rollback_reason=reason, rollback_from=state)
        self.store.set_state(self.name, State.ROLLBACK, status=Status.RUNNING, error=reason)
        self.store.log(self.name, "warning", f"rolling back: {reason}", state=state.value)
        log.warning("rolling back", release=self.name, reason=reason)
        self.emit(Kind.ROLLING_BACK, state=state.value, reason=reason)
        return State.ROLLBACK

    def _emit_transition(self, state: State, following: State, elapsed: float) -> None:
        self.emit(Kind.STATE_DONE, state=state.value, details={
            "duration_s": round(elapsed, 3), "next": following.value})
        milestone = {State.WINDOW: Kind.PROMOTED, State.DONE: Kind.DONE,
                     State.ROLLED_BACK: Kind.ROLLED_BACK}.get(following)
        if state == State.WINDOW and following == State.CLEANUP:
            milestone = Kind.WINDOW_CLOSED
        if milestone is not None:
            self.emit(milestone, state=following.value, reason=self.facts.rollback_reason
                      if milestone == Kind.ROLLED_BACK else None)

    def _outcome(self, row: ReleaseRow) -> Outcome:
        return Outcome(row.name, row.state, row.status, row.error)

    @property
    def facts(self) -> Facts:
        """The release's facts as last stored (the journal keeps them)."""
        return self.ctx.journal.facts

    @facts.setter
    def facts(self, facts: Facts) -> None:
        self.ctx.journal.facts = facts

    # ------------------------------------------------------------------ states

    def backup(self) -> State:
        if not self.cfg.backup.enabled:
            self.ctx.note("backup disabled in the config: no backup of blue was taken", "warning")
            return State.PROVISION
        with self.ctx.blue() as blue:
            tools = find_tools(server_major(blue), self.cfg.tools.pg_bindir)
            tables = backup.expected_data(blue, self.ctx.tables(blue))
        recorded = self.facts.backup
        previous = recorded.model_dump() if recorded is not None else None
        result = backup.backup(self.ctx.blue_endpoint, tools, self.cfg.backup, release=self.name,
                               tables=tables, previous=previous)
        self.ctx.fact(backup=result.as_fact())
        self.ctx.note("blue backed up and verified", path=result.path, sha256=result.sha256,
                      bytes=result.bytes, seconds=result.seconds, toc_entries=result.toc_entries)
        return State.PROVISION

    def provision(self) -> State:
        with self.ctx.blue() as blue:
            settings = schema.database_settings(blue)
            tools = find_tools(server_major(blue), self.cfg.tools.pg_bindir,
                               target_major=(self.facts.majors or {}).get("green"))
            self.ctx.record_blue_schema(blue)
        created = schema.ensure_database(self.ctx.green_endpoint, settings)
        with self.ctx.green() as green:
            if schema.is_provisioned(green, self.schema, self.name):
                self.ctx.note("green already holds blue's schema")
                return State.MIGRATE
            leftovers = schema.foreign_tables(green, self.schema)
            if leftovers:
                raise ReleaseFailed(
                    f"green database {self.cfg.green.dbname} already holds tables "
                    f"({', '.join(leftovers[:5])}) that this release did not create",
                    hint="point green at an empty database, or drop these tables")
        schema.copy_schema(self.ctx.blue_endpoint, self.ctx.green_endpoint, tools,
                           schema=self.schema, release=self.name)
        self.ctx.note("green provisioned with blue's schema", database_created=created)
        return State.MIGRATE

    def migrate(self) -> State:
        found = migrations.discover(self.cfg.migrations.dir)
        with self.ctx.blue() as blue:
            inherited = migrations.history(blue, self.schema)
        # Migrations may legitimately run long (a backfill): no client deadline.
        with self.ctx.green(lock_timeout_ms=60_000, deadline=None) as green:
            migrations.ensure_tracking(green, self.schema)
            migrations.inherit_history(green, inherited, self.schema)
            applied = migrations.apply_all(green, found, schema=self.schema, release=self.name)
        for a in applied:
            if not a.skipped:
                self.ctx.note(f"migration {a.name} applied", seconds=round(a.seconds, 3))
        self.ctx.fact(migrations=[a.name for a in applied])
        return State.SYNC

    def sync(self) -> State:
        """Green caught up and indexed, streaming from blue (``build_forward``)."""
        self.pair.build_forward()
        self.pair.refresh_matviews()
        return State.VALIDATE

    def validate(self) -> State:
        with self.ctx.blue() as blue, self.ctx.green() as green:
            self.ctx.verify_blue_schema(blue, "at validation")
            def catch_up() -> None:
                self.pair.catch_up(blue, green)

            report = validation.validate(
                self.ctx.blue_endpoint, self.ctx.green_endpoint, self.cfg.validate_,
                control_schema=self.schema, exclude_tables=self.ctx.excluded, catch_up=catch_up)
        self.ctx.validated(report.as_dict())
        for note in report.notes:
            self.ctx.note(note)
        if not report.ok:
            raise ReleaseFailed(
                f"green differs from blue: {'; '.join(report.problems[:5])}",
                hint="run `orchestrate validate` for the full report")
        self.ctx.note("green matches blue", tables=len(report.tables))
        return State.CANARY

    def canary(self) -> State | Pause:
        if (no_time := self.ctx.stop.before_canary()) is not None:
            return no_time
        self.stages.run()
        return State.PROMOTE

    def promote(self) -> State:
        """Green takes all writes; blue is fenced and kept current by reverse replication
        for the rollback window."""
        self.pair.switchover()
        self.pair.drop_forward()
        self.ctx.fact(forward_dropped=True, promoted_at=time.time())
        self.ctx.note("promoted: green takes all traffic and writes",
                      rollback_window_s=self.cfg.rollback.window)
        return State.WINDOW

    def window(self) -> State | Pause:
        """Keep reverse replication until the window closes; a person can roll back
        until then (`orchestrate rollback`)."""
        closes = self.facts.window_closes(self.cfg.rollback.window) or 0.0
        remaining = closes - time.time()
        if remaining > 0 and self.wait_window:
            self.ctx.note(f"rollback window open for {remaining:.0f}s more; waiting")
            reason = self.stages.watch_window(closes)
            if reason:
                self._enter_rollback(State.WINDOW, reason)
                return State.ROLLBACK
            remaining = closes - time.time()
        if remaining > 0:
            return Pause(f"promoted; the rollback window closes in {remaining:.0f}s")
        # A request taken in the window's last poll was promised a rollback.
        requested = self.ctx.journal.rollback_requested()
        if requested:
            self._enter_rollback(State.WINDOW, requested)
            return State.ROLLBACK
        return State.CLEANUP

    def cleanup(self) -> State:
        with self.ctx.blue() as blue, self.ctx.green() as green:
            self.pair.drop_all(blue, green)
        self.ctx.note("replication objects removed; release complete")
        return State.DONE

    def rollback(self) -> State:
        """Traffic back to blue with every acknowledged write on blue. Idempotent."""
        writable = self.facts.green_writable
        switched = self.facts.switched_over
        # Recorded before the fence (older records only know switched_over): a
        # switchover that failed half-way left blue read-only, and the rollback must
        # lift that whatever step it failed at.
        fenced = switched or self.facts.blue_fenced
        if not fenced:
            # Blue still takes writes: send users back first, then settle the data.
            self.ctx.route_to_blue()
        green = self.ctx.green_if_exists()
        if green is None and writable:
            raise ReleaseFailed("green is unreachable, and it took writes that blue must get "
                                "before the rollback can finish",
                                hint="bring green back, then run `orchestrate rollback` again")
        try:
            with self.ctx.blue() as blue:
                if writable and green is not None:
                    self.pair.settle_to_blue(blue, green)
                if fenced and self.cfg.blue.app_role:
                    fence.unfence(blue, self.cfg.blue.app_role)
                    self.ctx.fact(blue_fenced=False)
                    self.ctx.note("blue unfenced")
                if fenced:
                    # After a (partial) switchover the data moved first; users follow.
                    self.ctx.route_to_blue()
                self.pair.drop_all(blue, green)
        finally:
            if green is not None:
                green.close()
        if self.cfg.rollback.drop_green_database:
            self.pair.drop_green_database()
        self.ctx.fact(rolled_back_at=time.time())
        return State.ROLLED_BACK
