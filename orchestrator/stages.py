"""The canary stages and the rollback window: weights, hooks, analysis, manual gates.

A stage runs: its ``before`` hooks (while the previous weights still hold), the
router change, the analysis (``canary.analysis.run_stage``) under a guard
(``orchestrator.guard``: a rollback request, both sides' probes, the data path and
its lag), then its ``after`` hooks. An inconclusive stage pauses for a person when
the config says so. ``StageRunner.watch_window`` watches the rollback window after
promotion the same way, with the last stage's checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING

from orchestrator.canary.analysis import Evaluation, format_window, run_stage
from orchestrator.context import ReleaseContext, log
from orchestrator.datapath import ReplicationPair
from orchestrator.errors import ReleaseFailed
from orchestrator.events import Kind
from orchestrator.guard import STOP_WAITING, Guard, LagStreaks, probes
from orchestrator.routers.base import Weights

if TYPE_CHECKING:
    from orchestrator.canary.hooks import HookResult
    from orchestrator.config.metrics import MetricCheck

# How often a waiting orchestrator (rollback window, approval gate) looks for a
# rollback request made by another process: the promise is "within one poll".
REQUEST_POLL_S = 1.0


class CanaryFailed(ReleaseFailed):
    """A check breached its threshold, or the stage was aborted."""


class StageRunner:
    def __init__(self, ctx: ReleaseContext, pair: ReplicationPair) -> None:
        self.ctx = ctx
        self.pair = pair
        self.lag_streaks = LagStreaks()

    def run(self) -> None:
        """Every stage from the one the facts say is next; raises ``CanaryFailed``."""
        ctx = self.ctx
        labels = ctx.cfg.template_variables(window=format_window(ctx.cfg.canary.window))
        for index in range(ctx.facts.stage, len(ctx.cfg.canary.stages)):
            self._stage(index, labels)

    def _stage(self, index: int, labels: dict[str, str]) -> None:
        ctx = self.ctx
        canary = ctx.cfg.canary
        stage = canary.stages[index]
        with ctx.blue() as blue:
            ctx.verify_blue_schema(blue, f"before canary stage {index + 1}")
        if ctx.facts.awaiting_approval == index:
            # Resumed while paused after an inconclusive stage: still paused.
            self.wait_for_approval(index)
            ctx.fact(awaiting_approval=None)
        if stage.weight > 0 and not ctx.facts.green_writable:
            self.pair.open_green_for_writes(next_weight=stage.weight)
        if stage.manual_gate:
            self.wait_for_approval(index)
        # Before hooks decide whether users may reach this stage's weight, so they
        # run while the previous weights still hold (Flagger's pre-rollout hooks):
        # a smoke test in the 0 % stage tests green before any user reaches it.
        self._hooks("before", index)
        ctx.set_weights(Weights.green_at(stage.weight))
        interval = canary.interval_for(stage)
        ctx.note(f"stage {index + 1}/{len(canary.stages)}: {stage.weight}% to green",
                 duration_s=stage.duration, interval_s=interval)

        # At 0 % green serves no users: there is nothing to measure, only gates.
        checks = canary.checks_for(stage) if stage.weight > 0 else []
        # run_stage asks the guard every ~0.5 s while it waits, so an alert or
        # `orchestrate abort` acts within a second, not an interval.
        with self._guarded(index, stage.weight, interval, blue_too=True) as guard:
            outcome = run_stage(checks, ctx.metrics, labels, duration=stage.duration,
                                interval=interval, record=self._recorder(index, stage.weight),
                                should_abort=guard, sleep=ctx.sleep)
        if outcome.verdict == "fail":
            raise CanaryFailed(f"stage {stage.weight}%: {outcome.reason}")
        if outcome.verdict == "aborted":
            raise CanaryFailed(f"stage {stage.weight}% aborted: {outcome.reason}")
        if outcome.verdict == "inconclusive":
            if canary.on_inconclusive == "rollback":
                raise CanaryFailed(f"stage {stage.weight}%: {outcome.reason}")
            ctx.note(f"stage {stage.weight}% inconclusive, waiting for a person: "
                     f"{outcome.reason}", "warning")
            # `orchestrate promote` approves the stage recorded in the facts: record
            # the next one first, so that its approval is the one waited for (it
            # also opens that stage's manual gate: one decision to go on).
            ctx.fact(stage=index + 1, awaiting_approval=index + 1)
            self.wait_for_approval(index + 1)
            ctx.fact(awaiting_approval=None)
        self._hooks("after", index)
        ctx.fact(stage=index + 1)
        ctx.journal.emit(Kind.STAGE_PASSED, state="canary", stage=index + 1,
                         stages=len(canary.stages), weight=stage.weight)

    # ------------------------------------------------------------------- hooks

    def _hooks(self, phase: str, index: int) -> None:
        # Imported here: only the canary stages call hooks.
        from orchestrator.canary.hooks import first_blocking, run_hooks

        ctx = self.ctx
        stages = ctx.cfg.canary.stages
        stage = stages[index]
        webhooks = stage.before if phase == "before" else stage.after
        if not webhooks:
            return
        context = {
            "release": ctx.name, "service": ctx.cfg.release.service,
            "namespace": ctx.cfg.release.namespace,
            "version": ctx.cfg.release.version, "stage": index + 1,
            "stages": len(stages), "weight": stage.weight, "colour": "green",
            # What the router serves right now (null before the first change).
            "weights": asdict(weights) if (weights := ctx.facts.weights) else None,
        }

        def record(result: HookResult) -> None:
            self._record_hook(result, index, stage.weight)

        failed = first_blocking(run_hooks(webhooks, phase=phase, context=context,
                                          record=record))
        if failed is not None:
            raise CanaryFailed(f"stage {stage.weight}%: {failed.describe()}")

    def _record_hook(self, result: HookResult, index: int, weight: int) -> None:
        # Stored as measurements too, so `status` shows hooks next to checks.
        self.ctx.journal.measure(
            stage=index, weight=weight, check=f"hook:{result.hook}",
            value=None if result.status is None else float(result.status),
            baseline=None, verdict="pass" if result.ok else "fail",
            detail=result.describe())
        self.ctx.note(result.describe(), "info" if result.ok else "warning",
                      hook=result.hook, phase=result.phase, status=result.status,
                      attempts=result.attempts, on_failure=result.on_failure)

    # ------------------------------------------------------------------- gates

    def wait_for_approval(self, stage: int) -> None:
        ctx = self.ctx
        stages = len(ctx.cfg.canary.stages)
        # Past the last stage, what waits is the promotion, not a "stage N+1 of N".
        what = f"stage {stage + 1}" if stage < stages else "the promotion"
        announced = False
        while True:
            row = ctx.store.get(ctx.name)
            assert row is not None
            requested = row.rollback_requested or ctx.stop.check()
            if requested:
                raise CanaryFailed(f"aborted while waiting for approval: {requested}")
            if row.approved_stage is not None and row.approved_stage >= stage:
                ctx.note(f"{what} approved")
                return
            if not announced:
                ctx.journal.emit(Kind.AWAITING_APPROVAL, state="canary", stages=stages,
                                 stage=stage + 1 if stage < stages else None,
                                 details={"awaiting": what})
                ctx.note(f"waiting for approval of {what}: run `orchestrate "
                         f"promote --release {ctx.name}` (or `orchestrate abort`)", "warning")
                announced = True
            ctx.sleep(REQUEST_POLL_S)

    def watch_window(self, closes: float) -> str | None:
        """Until the rollback window closes (``closes``, a ``time.time()``): the reason
        to roll back, or None once closed.

        The window after 100 % is when a regression shows, so it is watched as a stage
        is: the last stage's checks go on being evaluated (their absolute limits: blue
        serves nobody now, so a comparison with blue has nothing to compare with), a
        rollback request is obeyed within a poll, and a side that stops answering rolls
        back. An inconclusive analysis (no traffic at night) does not end the watch."""
        ctx = self.ctx
        canary = ctx.cfg.canary
        last = canary.stages[-1]
        checks = window_checks(canary.checks_for(last))
        labels = ctx.cfg.template_variables(window=format_window(canary.window))
        interval = canary.interval_for(last)
        # Stored one past the last stage: `status` tells the window's rows apart.
        index = len(canary.stages)
        announced = False
        with self._guarded(index, 100, interval, blue_too=False, in_window=True) as guard:
            # A stop (signal, deadline) ends the wait; the release stays promoted.
            while (remaining := closes - time.time()) > 0 and not ctx.stop.stop_waiting():
                outcome = run_stage(checks, ctx.metrics, labels, duration=remaining,
                                    interval=interval, record=self._recorder(index, 100),
                                    should_abort=guard, sleep=ctx.sleep)
                if outcome.verdict == "aborted":
                    return None if outcome.reason == STOP_WAITING else outcome.reason
                if outcome.verdict == "fail":
                    return f"analysis in the rollback window: {outcome.reason}"
                if outcome.verdict == "pass":
                    break
                if not announced:
                    ctx.note(f"analysis in the rollback window inconclusive: {outcome.reason}; "
                             "watching on", "warning")
                    announced = True
        return None

    # ------------------------------------------------------------------- guard

    @contextmanager
    def _guarded(self, index: int, weight: int, interval: float, *, blue_too: bool,
                 in_window: bool = False) -> Iterator[Guard]:
        """The guard of a stage or the window, with its probes and its data-check
        thread (``orchestrator.guard``)."""
        with probes(self.ctx, interval, blue_too=blue_too) as side_probes, ExitStack() as stack:
            data_checks = ThreadPoolExecutor(1, thread_name_prefix="replication-check")
            # Not waited for: a check stuck on a paused server ends at its deadline.
            stack.callback(data_checks.shutdown, wait=False, cancel_futures=True)
            yield Guard(self.ctx, self.pair, stage=index, weight=weight, interval=interval,
                        side_probes=side_probes, data_checks=data_checks,
                        streaks=self.lag_streaks, in_window=in_window)

    def _recorder(self, index: int, weight: int) -> Callable[[Evaluation], None]:
        ctx = self.ctx
        # As people read it: "stage 2" of "stage 2/4", and past the last, the window.
        shown: int | str = index + 1 if index < len(ctx.cfg.canary.stages) else "window"

        def record(ev: Evaluation) -> None:
            ctx.journal.measure(stage=index, weight=weight, check=ev.check, value=ev.value,
                                baseline=ev.baseline, verdict=ev.verdict, detail=ev.detail)
            log.info("check", stage=shown, check=ev.check, value=ev.value,
                     verdict=ev.verdict, detail=ev.detail)

        return record


def window_checks(checks: list[MetricCheck]) -> list[MetricCheck]:
    """The checks as the rollback window evaluates them: blue serves nobody there, so
    a comparison with blue gives way to the check's absolute limits and its
    ``blue_idle`` ones (the tighter of each); a check left with neither is skipped."""
    kept = []
    for c in checks:
        idle = c.blue_idle
        top = [v for v in (c.max, idle.max if idle else None) if v is not None]
        bottom = [v for v in (c.min, idle.min if idle else None) if v is not None]
        if not top and not bottom:
            continue
        kept.append(c.model_copy(update={
            "max": min(top) if top else None, "min": max(bottom) if bottom else None,
            "max_increase_over_blue": None, "max_decrease_from_blue": None,
            "max_ratio_to_blue": None, "blue_idle": None, "baseline_query": None}))
    return kept
