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
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from orchestrator import preflight
from orchestrator.canary.analysis import Evaluation, format_window, run_stage
from orchestrator.canary.metrics import MetricsSource
from orchestrator.config import ReleaseConfig
from orchestrator.errors import (
    OrchestrateError,
    PreflightError,
    ReleaseFailed,
    StateUnavailable,
)
from orchestrator.logging import get_logger, scrub
from orchestrator.pg import (
    backup,
    catalog,
    fence,
    fingerprint,
    initial_copy,
    matviews,
    migrations,
    replication,
    schema,
    sequences,
)
from orchestrator.pg import validate as validation
from orchestrator.pg.conn import connect, server_major
from orchestrator.pg.probe import SideProbe
from orchestrator.pg.tools import find_tools
from orchestrator.record import AFTER_PROMOTION, TERMINAL, Facts, State, Status
from orchestrator.routers.base import TrafficRouter, WeightDriftError, Weights
from orchestrator.store import ReleaseRow, StateStore
from orchestrator.ui import Display, NoDisplay

log = get_logger("orchestrate")


# State, TERMINAL and AFTER_PROMOTION moved to orchestrator.record; still importable
# from here.
__all__ = ["AFTER_PROMOTION", "REQUEST_POLL_S", "TERMINAL", "CanaryFailed", "Outcome",
           "Release", "State", "Status", "config_digest", "release_for"]

# How often a waiting orchestrator (rollback window, approval gate) looks for a
# rollback request made by another process: the promise is "within one poll".
REQUEST_POLL_S = 1.0


class CanaryFailed(ReleaseFailed):
    """A check breached its threshold, or the stage was aborted."""


@dataclass(frozen=True)
class Outcome:
    name: str
    state: State
    status: Status
    error: str | None

    @property
    def exit_code(self) -> int:
        if self.status == Status.PROMOTED:
            return 0
        return 1


def config_digest(cfg: ReleaseConfig) -> tuple[str, dict[str, Any]]:
    """The config as stored with the release (secrets are references, never values),
    and a hash of what the user wrote: defaults are left out of the hash, so that an
    upgrade of orchestrate that adds a setting does not block resuming a release."""
    data = json.loads(cfg.model_dump_json(by_alias=True))
    written = json.loads(cfg.model_dump_json(by_alias=True, exclude_unset=True))
    text = json.dumps(written, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), data


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
        self.fwd = replication.forward(self.name)
        self.rev = replication.reverse(self.name)
        self.facts = Facts()
        # Worker errors of each subscription when a stage's first check saw it.
        self._apply_errors: dict[tuple[int, str], int] = {}
        self._handlers: dict[State, Callable[[], State]] = {
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
        self._drop_leftover_slots()
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
            # (past the window) and the rollback itself ignore it.
            if row.rollback_requested and state not in {State.ROLLBACK, State.CLEANUP}:
                state = self._enter_rollback(state, row.rollback_requested)
            handler = self._handlers[state]
            started = time.monotonic()
            log.info("state", release=self.name, state=state.value)
            try:
                following = handler()
            except _WindowOpen as open_window:
                self._note(open_window.message)
                break
            except StateUnavailable as lost:
                # Nothing can be recorded, so nothing is decided: no rollback starts
                # on a side we cannot even write the decision to. The rerun resumes.
                log.error("state database lost", release=self.name,  # noqa: TRY400
                          state=state.value,
                          error=lost.message)
                raise
            except OrchestrateError as exc:
                state = self._on_failure(state, exc)
                continue
            except (psycopg.Error, OSError) as exc:
                state = self._on_failure(state, ReleaseFailed(scrub(str(exc)).strip()))
                continue
            elapsed = time.monotonic() - started
            self.store.log(self.name, "info", f"{state.value} done", state=state.value,
                           duration_s=elapsed)
            status = {State.WINDOW: Status.PROMOTED, State.DONE: Status.PROMOTED,
                      State.ROLLED_BACK: Status.ROLLED_BACK}.get(following)
            self.store.set_state(self.name, following, status=status, clear_error=False)
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
        self._fact(rollback_reason=reason, rollback_from=state)
        self.store.set_state(self.name, State.ROLLBACK, status=Status.RUNNING, error=reason)
        self.store.log(self.name, "warning", f"rolling back: {reason}", state=state.value)
        log.warning("rolling back", release=self.name, reason=reason)
        return State.ROLLBACK

    def _outcome(self, row: ReleaseRow) -> Outcome:
        return Outcome(row.name, row.state, row.status, row.error)

    def _fact(self, **facts: Any) -> None:
        """Record facts (checked by ``Facts``: a misspelt one is an error) and take
        the release's facts as stored after it."""
        self.facts = self.store.merge_facts(self.name, **facts)

    def _note(self, message: str, level: str = "info", **details: Any) -> None:
        self.store.log(self.name, level, message, details=details or None)
        getattr(log, level if level != "critical" else "error")(message, release=self.name,
                                                                 **details)

    # ------------------------------------------------------------- connections

    def _blue(self, **kw: Any) -> psycopg.Connection[Any]:
        return connect(self.cfg.blue, role="blue", **kw)

    def _green(self, **kw: Any) -> psycopg.Connection[Any]:
        return connect(self.cfg.green, role="green", **kw)

    def _tables(self, conn: psycopg.Connection[Any]) -> list[catalog.Table]:
        return catalog.user_tables(conn, exclude_schemas=(self.schema,),
                                   exclude_tables=tuple(self.cfg.sync.exclude_tables))

    # ------------------------------------------------------------------ states

    def backup(self) -> State:
        if not self.cfg.backup.enabled:
            self._note("backup disabled in the config: no backup of blue was taken", "warning")
            return State.PROVISION
        with self._blue() as blue:
            tools = find_tools(server_major(blue), self.cfg.tools.pg_bindir)
            tables = backup.expected_data(blue, self._tables(blue))
        recorded = self.facts.backup
        previous = recorded.model_dump() if recorded is not None else None
        result = backup.backup(self.cfg.blue, tools, self.cfg.backup, release=self.name,
                               tables=tables, previous=previous)
        self._fact(backup=result.as_fact())
        self._note("blue backed up and verified", path=result.path, sha256=result.sha256,
                   bytes=result.bytes, seconds=result.seconds, toc_entries=result.toc_entries)
        return State.PROVISION

    def provision(self) -> State:
        with self._blue() as blue:
            settings = schema.database_settings(blue)
            tools = find_tools(server_major(blue), self.cfg.tools.pg_bindir)
            self._record_blue_schema(blue)
        created = schema.ensure_database(self.cfg.green, settings)
        with self._green() as green:
            if schema.is_provisioned(green, self.schema, self.name):
                self._note("green already holds blue's schema")
                return State.MIGRATE
            leftovers = schema.foreign_tables(green, self.schema)
            if leftovers:
                raise ReleaseFailed(
                    f"green database {self.cfg.green.dbname} already holds tables "
                    f"({', '.join(leftovers[:5])}) that this release did not create",
                    hint="point green at an empty database, or drop these tables")
        schema.copy_schema(self.cfg.blue, self.cfg.green, tools, schema=self.schema,
                           release=self.name)
        self._note("green provisioned with blue's schema", database_created=created)
        return State.MIGRATE

    def migrate(self) -> State:
        found = migrations.discover(self.cfg.migrations.dir)
        with self._blue() as blue:
            inherited = migrations.history(blue, self.schema)
        # Migrations may legitimately run long (a backfill): no client deadline.
        with self._green(lock_timeout_ms=60_000, deadline=None) as green:
            migrations.ensure_tracking(green, self.schema)
            migrations.inherit_history(green, inherited, self.schema)
            applied = migrations.apply_all(green, found, schema=self.schema, release=self.name)
        for a in applied:
            if not a.skipped:
                self._note(f"migration {a.name} applied", seconds=round(a.seconds, 3))
        self._fact(migrations=[a.name for a in applied])
        return State.SYNC

    def sync(self) -> State:
        """Green caught up and indexed: snapshot-consistent parallel copy (or the
        subscription's own initial sync), post-data rebuilt, streaming from the slot."""
        with self._blue() as blue, self._green() as green:
            tables = self._tables(blue)
            tools = find_tools(server_major(blue), self.cfg.tools.pg_bindir)
            self._record_blue_schema(blue)
            # Found now, not when green is about to take writes.
            replication.reverse_column_lists(green, tables, self._tables(green))
        labels = {"copy": "initial copy (bytes)", "post-data": "indexes and constraints"}
        report = initial_copy.initial_sync(
            self.cfg.blue, self.cfg.green, tables, names=self.fwd, tools=tools,
            control_schema=self.schema, config=self.cfg.sync.initial_copy,
            origin_none=self.facts.mode == "bidirectional",
            copy_timeout=self.cfg.sync.initial_copy_timeout,
            catchup_timeout=self.cfg.sync.catchup_timeout, poll=self.cfg.sync.poll_interval,
            progress=lambda phase, done, total: self.display.progress(
                phase, labels.get(phase, phase), done, total))
        for phase in labels:
            self.display.finish(phase)
        summary = report.as_dict()
        self._fact(sync=summary)
        self._note("green caught up and indexed",
                   **{k: v for k, v in summary.items() if k.endswith("_s")})
        self._refresh_matviews()
        return State.VALIDATE

    def validate(self) -> State:
        with self._blue() as blue, self._green() as green:
            self._verify_blue_schema(blue, "at validation")
            def catch_up() -> None:
                replication.wait_applied(
                    blue, green, schema=self.schema, direction="fwd",
                    subscription=self.fwd.subscription, timeout=self.cfg.sync.catchup_timeout)

            report = validation.validate(
                self.cfg.blue, self.cfg.green, self.cfg.validate_, control_schema=self.schema,
                exclude_tables=tuple(self.cfg.sync.exclude_tables), catch_up=catch_up)
        self._fact(validation=report.as_dict())
        for note in report.notes:
            self._note(note)
        if not report.ok:
            raise ReleaseFailed(
                f"green differs from blue: {'; '.join(report.problems[:5])}",
                hint="run `orchestrate validate` for the full report")
        self._note("green matches blue", tables=len(report.tables))
        return State.CANARY

    def canary(self) -> State:
        # Imported here: only the canary stages call hooks.
        from orchestrator.canary.hooks import HookResult, first_blocking, run_hooks

        canary = self.cfg.canary
        stages = canary.stages
        labels = {
            "service": self.cfg.release.service, "namespace": self.cfg.release.namespace,
            "version": self.cfg.release.version, "release": self.name,
            "window": format_window(canary.window), **self.cfg.prometheus.labels,
        }
        for index in range(self.facts.stage, len(stages)):
            stage = stages[index]
            with self._blue() as blue:
                self._verify_blue_schema(blue, f"before canary stage {index + 1}")
            if self.facts.awaiting_approval == index:
                # Resumed while paused after an inconclusive stage: still paused.
                self._wait_for_approval(index)
                self._fact(awaiting_approval=None)
            if stage.weight > 0 and not self.facts.green_writable:
                self._open_green_for_writes(next_weight=stage.weight)
            if stage.manual_gate:
                self._wait_for_approval(index)

            def record_hook(result: HookResult, index: int = index,
                            weight: int = stage.weight) -> None:
                # Stored as measurements too, so `status` shows hooks next to checks.
                self.store.record_measurement(
                    self.name, stage=index, weight=weight, check=f"hook:{result.hook}",
                    value=None if result.status is None else float(result.status),
                    baseline=None, verdict="pass" if result.ok else "fail",
                    detail=result.describe())
                self._note(result.describe(), "info" if result.ok else "warning",
                           hook=result.hook, phase=result.phase, status=result.status,
                           attempts=result.attempts, on_failure=result.on_failure)

            def hooks(phase: str, index: int = index) -> None:
                stage = stages[index]
                webhooks = stage.before if phase == "before" else stage.after
                if not webhooks:
                    return
                context = {
                    "release": self.name, "service": self.cfg.release.service,
                    "namespace": self.cfg.release.namespace,
                    "version": self.cfg.release.version, "stage": index + 1,
                    "stages": len(stages), "weight": stage.weight, "colour": "green",
                    # What the router serves right now (null before the first change).
                    "weights": asdict(weights) if (weights := self.facts.weights) else None,
                }
                failed = first_blocking(run_hooks(webhooks, phase=phase, context=context,
                                                  record=record_hook))
                if failed is not None:
                    raise CanaryFailed(f"stage {stage.weight}%: {failed.describe()}")

            # Before hooks decide whether users may reach this stage's weight, so they
            # run while the previous weights still hold (Flagger's pre-rollout hooks):
            # a smoke test in the 0 % stage tests green before any user reaches it.
            hooks("before")
            self._set_weights(Weights.green_at(stage.weight))
            interval = canary.interval_for(stage)
            self._note(f"stage {index + 1}/{len(stages)}: {stage.weight}% to green",
                       duration_s=stage.duration, interval_s=interval)

            def record(ev: Evaluation, index: int = index, weight: int = stage.weight) -> None:
                self.store.record_measurement(
                    self.name, stage=index, weight=weight, check=ev.check, value=ev.value,
                    baseline=ev.baseline, verdict=ev.verdict, detail=ev.detail)
                log.info("check", stage=index, check=ev.check, value=ev.value,
                         verdict=ev.verdict, detail=ev.detail)

            # At 0 % green serves no users: there is nothing to measure, only gates.
            checks = canary.checks_for(stage) if stage.weight > 0 else []
            # run_stage asks for a rollback request every ~0.5 s while it waits, so an
            # alert or `orchestrate abort` acts within a second, not an interval.
            with self._probes(interval, blue_too=True) as probes, ExitStack() as stack:
                data_checks = ThreadPoolExecutor(1, thread_name_prefix="replication-check")
                # Not waited for: a check stuck on a paused server ends at its deadline.
                stack.callback(data_checks.shutdown, wait=False, cancel_futures=True)
                outcome = run_stage(
                    checks, self.metrics, labels, duration=stage.duration,
                    interval=interval, record=record,
                    should_abort=self._stage_guard(index, stage.weight, interval, probes,
                                                   data_checks),
                    sleep=self.sleep)
            if outcome.verdict == "fail":
                raise CanaryFailed(f"stage {stage.weight}%: {outcome.reason}")
            if outcome.verdict == "aborted":
                raise CanaryFailed(f"stage {stage.weight}% aborted: {outcome.reason}")
            if outcome.verdict == "inconclusive":
                if canary.on_inconclusive == "rollback":
                    raise CanaryFailed(f"stage {stage.weight}%: {outcome.reason}")
                self._note(f"stage {stage.weight}% inconclusive, waiting for a person: "
                           f"{outcome.reason}", "warning")
                # `orchestrate promote` approves the stage recorded in the facts: record
                # the next one first, so that its approval is the one waited for (it
                # also opens that stage's manual gate: one decision to go on).
                self._fact(stage=index + 1, awaiting_approval=index + 1)
                self._wait_for_approval(index + 1)
                self._fact(awaiting_approval=None)
            hooks("after")
            self._fact(stage=index + 1)
        return State.PROMOTE

    def promote(self) -> State:
        """Green takes all writes; blue is fenced and kept current by reverse replication
        for the rollback window."""
        self._switchover()
        with self._blue() as blue, self._green() as green:
            replication.drop_subscription(green, self.fwd.subscription)
            replication.drop_publication(blue, self.fwd.publication)
            replication.drop_slot(blue, self.fwd.slot)
        self._fact(forward_dropped=True, promoted_at=time.time())
        self._note("promoted: green takes all traffic and writes",
                   rollback_window_s=self.cfg.rollback.window)
        return State.WINDOW

    def window(self) -> State:
        """Keep reverse replication until the window closes; a person can roll back
        until then (`orchestrate rollback`)."""
        closes = (self.facts.promoted_at or 0.0) + self.cfg.rollback.window
        remaining = closes - time.time()
        if remaining > 0 and self.wait_window:
            self._note(f"rollback window open for {remaining:.0f}s more; waiting")
            stage = len(self.cfg.canary.stages)
            with self._probes(self.cfg.canary.interval, blue_too=False) as probes:
                while remaining > 0:
                    reason = self._rollback_requested() or self._probe_problem(
                        probes, stage, 100)
                    if reason:
                        self._enter_rollback(State.WINDOW, reason)
                        return State.ROLLBACK
                    self.sleep(min(REQUEST_POLL_S, remaining))
                    remaining = closes - time.time()
        if remaining > 0:
            raise _WindowOpen(remaining)
        return State.CLEANUP

    def cleanup(self) -> State:
        with self._blue() as blue, self._green() as green:
            self._drop_replication(blue, green)
        self._note("replication objects removed; release complete")
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
            self._route_to_blue()
        green = self._green_if_exists()
        if green is None and writable:
            raise ReleaseFailed("green is unreachable, and it took writes that blue must get "
                                "before the rollback can finish",
                                hint="bring green back, then run `orchestrate rollback` again")
        try:
            with self._blue() as blue:
                if writable and green is not None:
                    self._bring_green_writes_to_blue(blue, green)
                if fenced and self.cfg.blue.app_role:
                    fence.unfence(blue, self.cfg.blue.app_role)
                    self._fact(blue_fenced=False)
                    self._note("blue unfenced")
                if fenced:
                    # After a (partial) switchover the data moved first; users follow.
                    self._route_to_blue()
                self._drop_replication(blue, green)
        finally:
            if green is not None:
                green.close()
        if self.cfg.rollback.drop_green_database:
            self._drop_green_database()
        self._fact(rolled_back_at=time.time())
        return State.ROLLED_BACK

    def _bring_green_writes_to_blue(self, blue: psycopg.Connection[Any],
                                    green: psycopg.Connection[Any]) -> None:
        """Fence green, wait until blue applied green's last commit, move blue's
        sequences past green's."""
        if self.cfg.green.app_role:
            ended = fence.fence(green, self.cfg.green.app_role)
            self._note("green fenced", sessions_ended=ended)
        if replication.subscription_exists(blue, self.rev.subscription):
            if replication.ensure_enabled(blue, self.rev.subscription):
                self._note("reverse subscription was disabled; enabled again to bring "
                           "green's writes to blue", "warning")
            waited = replication.wait_applied(
                green, blue, schema=self.schema, direction="rev",
                subscription=self.rev.subscription, timeout=self.cfg.sync.catchup_timeout)
            self._note("blue has every write green committed", catchup_s=round(waited, 3))
        else:
            self._note("green took writes without reverse replication (risk accepted in the "
                       "config): writes made on green are not on blue", "critical")
        moves = sequences.sync_past(green, blue, margin=self.cfg.sync.sequence_margin,
                                    exclude_schemas=(self.schema,))
        self._note("blue's sequences moved past green's", moved=sum(1 for m in moves if m.moved))

    # ----------------------------------------------------------------- helpers

    def _open_green_for_writes(self, *, next_weight: int) -> None:
        """Before the first request reaches green's application."""
        if self.facts.mode == "bidirectional":
            with self._blue() as blue, self._green() as green:
                moves = sequences.sync_past(blue, green, margin=self.cfg.sync.sequence_margin,
                                            exclude_schemas=(self.schema,))
                self._start_reverse(blue, green)
            self._note("green opened for writes; its changes flow back to blue",
                       sequences_moved=sum(1 for m in moves if m.moved))
        elif next_weight == 100 or not self.cfg.sync.accept_write_loss_risk:
            self._switchover()
        else:
            with self._blue() as blue, self._green() as green:
                sequences.sync_past(blue, green, margin=self.cfg.sync.sequence_margin,
                                    exclude_schemas=(self.schema,))
            self._note("green takes writes WITHOUT replication back to blue (accepted in "
                       "config): a rollback will not carry them to blue", "warning")
        self._fact(green_writable=True)

    def _switchover(self) -> None:
        """Fence blue, let green apply blue's last commit, move sequences, and start the
        reverse direction. The write pause lasts from the fence to the router change."""
        if self.facts.switched_over:
            return
        started = time.monotonic()
        with self._blue() as blue, self._green() as green:
            self._verify_blue_schema(blue, "before the switchover")
            if self.cfg.blue.app_role:
                # Recorded before the fence: a failure at any later step (or a crash)
                # rolls back with blue unfenced.
                self._fact(blue_fenced=True)
                fence.fence(blue, self.cfg.blue.app_role)
            if replication.ensure_enabled(green, self.fwd.subscription):
                self._note("forward subscription was disabled; enabled again to catch up",
                           "warning")
            waited = replication.wait_applied(
                blue, green, schema=self.schema, direction="fwd",
                subscription=self.fwd.subscription, timeout=self.cfg.sync.catchup_timeout)
            sequences.sync_past(blue, green, margin=self.cfg.sync.sequence_margin,
                                exclude_schemas=(self.schema,))
            if self.facts.mode != "bidirectional":
                # Without origin filtering the forward direction must be gone before the
                # reverse one starts, or changes would loop.
                replication.drop_subscription(green, self.fwd.subscription)
                replication.drop_slot(blue, self.fwd.slot)
                self._fact(forward_dropped=True)
            self._start_reverse(blue, green)
            # Before the router moves: a crash between the two must roll back as if
            # green took writes (the reverse path brings them to blue).
            self._fact(green_writable=True)
        self._set_weights(Weights.green_at(100))
        pause = time.monotonic() - started
        self._fact(switched_over=True, green_writable=True, switchover_pause_s=round(pause, 3))
        self._note("switchover done: blue fenced, green caught up and taking writes",
                   write_pause_s=round(pause, 3), catchup_s=round(waited, 3),
                   fenced=bool(self.cfg.blue.app_role))

    def _start_reverse(self, blue: psycopg.Connection[Any], green: psycopg.Connection[Any]
                       ) -> None:
        """Green -> blue, only the columns blue has (green may have new ones)."""
        blue_tables = {t.qname: t for t in self._tables(blue)}
        green_tables = [t for t in self._tables(green) if t.qname in blue_tables]
        columns = replication.reverse_column_lists(green, list(blue_tables.values()),
                                                   green_tables)
        heartbeat = catalog.Table(self.schema, replication.HEARTBEAT_TABLE, ["direction"])
        replication.ensure_publication(green, self.rev.publication, [*green_tables, heartbeat],
                                       columns)
        opts = replication.SubscriptionOptions(
            copy_data=False, origin_none=self.facts.mode == "bidirectional",
            binary=min((self.facts.majors or {}).values() or [0]) >= 16)
        replication.ensure_subscription(blue, self.rev.subscription,
                                        self.cfg.green.conninfo(for_peer=True),
                                        self.rev.publication, opts)
        # Proves the reverse path works end to end before anyone depends on it.
        replication.wait_applied(green, blue, schema=self.schema, direction="rev",
                                 subscription=self.rev.subscription,
                                 timeout=self.cfg.sync.catchup_timeout)

    def _record_blue_schema(self, blue: psycopg.Connection[Any]) -> None:
        """Once, before green is built from blue's schema (kept on resume)."""
        if self.facts.blue_fingerprint is None:
            self._fact(blue_fingerprint=fingerprint.schema_fingerprint(
                blue, exclude_schemas=(self.schema,),
                exclude_tables=tuple(self.cfg.sync.exclude_tables)))

    def _verify_blue_schema(self, blue: psycopg.Connection[Any], when: str) -> None:
        if self.facts.blue_fingerprint is not None:
            fingerprint.verify(blue, self.facts.blue_fingerprint, when=when,
                               exclude_schemas=(self.schema,),
                               exclude_tables=tuple(self.cfg.sync.exclude_tables))

    def _refresh_matviews(self) -> None:
        """Replication does not carry their contents: fill them from the copied rows."""
        with self._blue() as blue, self._green() as green:
            on_blue = {m.qualified for m in matviews.matviews(blue, exclude_schemas=(
                self.schema,)) if m.populated}
            done = matviews.refresh_all(green, exclude_schemas=(self.schema,),
                                        populated_on_blue=on_blue,
                                        timeout=self.cfg.sync.initial_copy_timeout)
        if done:
            self._fact(matviews_refreshed=[d.as_dict() for d in done])
            self._note("materialized views refreshed on green", count=len(done))

    def _set_weights(self, target: Weights) -> None:
        expected = self.facts.weights
        self._fact(weights_target=target)
        try:
            actual = self.router.set_weights(target, expected=expected)
        except WeightDriftError as drift:
            # A crash between the router change and recording it leaves the router at
            # the target we were moving to: that is ours, not a drift.
            if drift.actual != target:
                raise
            actual = drift.actual
        self._fact(weights=actual)
        log.info("weights", release=self.name, weights=str(actual))

    def _route_to_blue(self) -> None:
        if self.facts.weights is None and self.facts.weights_target is None:
            return
        target = Weights.green_at(0)
        actual = self.router.set_weights(target)
        self._fact(weights=actual)
        self._note("traffic back on blue", weights=str(actual))

    def _drop_replication(self, blue: psycopg.Connection[Any],
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
            initial_copy.restore_sync_settings(green, control_schema=self.schema)

    def _green_if_exists(self) -> psycopg.Connection[Any] | None:
        """Green's database, or None when it was never created or cannot be reached."""
        try:
            # Short: a paused green must not hold up sending users back to blue.
            timeout = self.cfg.canary.probe.timeout
            return self._green(attempts=2, connect_timeout=timeout, deadline=timeout * 2)
        except OrchestrateError as exc:
            self._note(f"green not reachable: {exc.message}", "warning")
            return None

    def _drop_leftover_slots(self) -> None:
        """Slots of finished or abandoned releases make the server keep WAL forever."""
        for db, role in ((self.cfg.blue, "blue"), (self.cfg.green, "green")):
            try:
                conn = connect(db, role=role, attempts=1)
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
                    self._note(f"dropped leftover replication slot {slot.name} on {role}",
                               "warning", retained_bytes=slot.retained_bytes)

    def _slot_release(self, slot: str) -> ReleaseRow | None:
        # Slot names cannot always be turned back into release names (replication.Names
        # hashes some): compare with the names of the release that may be running.
        other = self.store.active_other_than(self.name)
        if other is not None and slot in {replication.forward(other.name).slot,
                                          replication.reverse(other.name).slot}:
            return other
        return None

    def _drop_green_database(self) -> None:
        from psycopg import sql

        with connect(self.cfg.green, dbname="postgres", role="green") as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(self.cfg.green.dbname)))
        self._note("green database dropped")

    @contextmanager
    def _probes(self, interval: float, *, blue_too: bool) -> Iterator[list[SideProbe]]:
        """Green's (and blue's) own health, probed in the background for a stage or
        the window: a paused server is invisible to Prometheus."""
        cfg = self.cfg.canary.probe
        sides = [(self.cfg.green, "green")] + ([(self.cfg.blue, "blue")] if blue_too else [])
        probes = [SideProbe(db, side, interval=cfg.interval or interval, timeout=cfg.timeout,
                            failure_limit=cfg.failure_limit) for db, side in sides]
        with ExitStack() as stack:
            for probe in probes:
                stack.enter_context(probe)
            yield probes

    def _probe_problem(self, probes: list[SideProbe], index: int, weight: int) -> str | None:
        for probe in probes:
            for result in probe.drain():
                self.store.record_measurement(
                    self.name, stage=index, weight=weight, check=f"probe:{result.side}",
                    value=round(result.seconds, 4), baseline=self.cfg.canary.probe.timeout,
                    verdict="pass" if result.ok else "fail", detail=result.detail)
                if not result.ok:
                    self._note(f"{result.side} probe failed: {result.detail}", "warning")
            problem = probe.problem()
            if problem:
                return problem
        return None

    def _stage_guard(self, index: int, weight: int, interval: float,
                     probes: list[SideProbe], data_checks: ThreadPoolExecutor
                     ) -> Callable[[], str | None]:
        """What can end a stage besides its metrics: a rollback request (checked on
        every call), a side that stopped answering (its probe), and, once per
        interval, the data path itself. Argo Rollouts and Flagger cannot see it: a
        subscription that stopped applying makes green drift from blue and a later
        rollback slow or lossy, however good the HTTP metrics.

        The data-path check runs on ``data_checks``' thread: on a server that has just
        stopped answering it waits up to ``canary.probe.timeout``, and a rollback
        request must not wait behind it."""
        last = [float("-inf")]
        running: list[Future[_ReplicationCheck]] = []

        def guard() -> str | None:
            reason = self._rollback_requested()
            if reason:
                return reason
            problem = self._probe_problem(probes, index, weight)
            if problem:
                return problem
            if running:
                if not running[0].done():
                    return None
                return self._record_replication_check(running.pop().result(), index, weight)
            now = time.monotonic()
            if now - last[0] < interval:
                return None
            last[0] = now
            if any(p.failing for p in probes):
                # Its probe judges a side that does not answer; the replication check
                # would only block on it.
                return None
            running.append(data_checks.submit(self._replication_check, index))
            return None

        return guard

    def _record_replication_check(self, check: _ReplicationCheck, index: int,
                                  weight: int) -> str | None:
        """On the machine's thread: the store's connection is not shared."""
        if check.postponed:
            # One blip is not a verdict: the probes count failures against their
            # limit and fail the stage; this check waits for the next interval.
            self._note(f"replication check postponed: {check.postponed}", "warning")
            return None
        for what, lag in check.lags:
            over = lag is not None and lag > self.cfg.sync.max_lag_bytes
            self.store.record_measurement(
                self.name, stage=index, weight=weight, check=f"replication-lag:{what}",
                value=None if lag is None else float(lag),
                baseline=float(self.cfg.sync.max_lag_bytes),
                verdict="inconclusive" if over else "pass",
                detail="slot lag in bytes (WAL the subscriber has not confirmed)")
        return check.problem

    def _replication_check(self, index: int) -> _ReplicationCheck:
        """Both subscriptions applying, and how far behind each is. Runs on a worker
        thread with connections of its own; touches neither the store nor the facts
        it does not read."""
        deadline = self.cfg.canary.probe.timeout
        try:
            blue = self._blue(attempts=1, deadline=deadline)
            green = self._green(attempts=1, deadline=deadline)
        except OrchestrateError as exc:
            return _ReplicationCheck(postponed=exc.message)
        result = _ReplicationCheck()
        try:
            with blue, green:
                paths = []
                if not self.facts.forward_dropped:
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
                    result.lags.append((what, replication.lag_bytes(pub, slot)))
        except psycopg.OperationalError as exc:
            # The server stopped answering mid-check: the probes judge that.
            return _ReplicationCheck(postponed=str(exc).strip())
        return result

    def _rollback_requested(self) -> str | None:
        row = self.store.get(self.name)
        return row.rollback_requested if row else None

    def _wait_for_approval(self, stage: int) -> None:
        announced = False
        while True:
            row = self.store.get(self.name)
            assert row is not None
            if row.rollback_requested:
                raise CanaryFailed(f"aborted while waiting for approval: "
                                   f"{row.rollback_requested}")
            if row.approved_stage is not None and row.approved_stage >= stage:
                self._note(f"stage {stage + 1} approved")
                return
            if not announced:
                self._note(f"waiting for approval of stage {stage + 1}: run `orchestrate "
                           f"promote --release {self.name}` (or `orchestrate abort`)", "warning")
                announced = True
            self.sleep(REQUEST_POLL_S)


def release_for(cfg: ReleaseConfig, *, store: StateStore | None = None, **kw: Any) -> Release:
    """A Release wired to the real backends the config names (router, Prometheus)."""
    # Imported here: the state machine itself depends only on the interfaces.
    from orchestrator.canary.metrics import PrometheusMetrics
    from orchestrator.routers import build_router

    return Release(cfg, store=store or StateStore.for_config(cfg),
                   router=build_router(cfg.router), metrics=PrometheusMetrics(cfg.prometheus),
                   **kw)


@dataclass
class _ReplicationCheck:
    """What one data-path check found (see Release._replication_check)."""

    problem: str | None = None
    postponed: str = ""  # could not look: why
    lags: list[tuple[str, int | None]] = field(default_factory=list)


class _WindowOpen(OrchestrateError):
    """Not a failure: the rollback window is still open."""

    def __init__(self, remaining: float) -> None:
        super().__init__(f"promoted; the rollback window closes in {remaining:.0f}s",
                         hint="run `orchestrate release` again after that to clean up, or "
                         "`orchestrate rollback` to go back to blue")
        self.remaining = remaining
