"""The canary stages and the rollback window: weights, hooks, analysis, manual gates,
and the guard that can end a stage besides its metrics.

A stage runs: its ``before`` hooks (while the previous weights still hold), the
router change, the analysis (``canary.analysis.run_stage``) under a guard that
looks for a rollback request, probes both sides and checks the data path, then
its ``after`` hooks. An inconclusive stage pauses for a person when the config
says so. ``StageRunner.watch_window`` is the same guard (request and probes) for
the rollback window after promotion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING

from orchestrator.canary.analysis import Evaluation, format_window, run_stage
from orchestrator.context import ReleaseContext, log
from orchestrator.datapath import ReplicationCheck, ReplicationPair
from orchestrator.errors import ReleaseFailed
from orchestrator.events import Kind
from orchestrator.pg.probe import SideProbe
from orchestrator.routers.base import Weights

if TYPE_CHECKING:
    from orchestrator.canary.hooks import HookResult

# How often a waiting orchestrator (rollback window, approval gate) looks for a
# rollback request made by another process: the promise is "within one poll".
REQUEST_POLL_S = 1.0


class CanaryFailed(ReleaseFailed):
    """A check breached its threshold, or the stage was aborted."""


class StageRunner:
    def __init__(self, ctx: ReleaseContext, pair: ReplicationPair) -> None:
        self.ctx = ctx
        self.pair = pair

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

        def record(ev: Evaluation) -> None:
            ctx.journal.measure(stage=index, weight=stage.weight, check=ev.check,
                                value=ev.value, baseline=ev.baseline, verdict=ev.verdict,
                                detail=ev.detail)
            log.info("check", stage=index + 1, check=ev.check, value=ev.value,
                     verdict=ev.verdict, detail=ev.detail)

        # At 0 % green serves no users: there is nothing to measure, only gates.
        checks = canary.checks_for(stage) if stage.weight > 0 else []
        # run_stage asks for a rollback request every ~0.5 s while it waits, so an
        # alert or `orchestrate abort` acts within a second, not an interval.
        with self.probes(interval, blue_too=True) as probes, ExitStack() as stack:
            data_checks = ThreadPoolExecutor(1, thread_name_prefix="replication-check")
            # Not waited for: a check stuck on a paused server ends at its deadline.
            stack.callback(data_checks.shutdown, wait=False, cancel_futures=True)
            outcome = run_stage(
                checks, ctx.metrics, labels, duration=stage.duration,
                interval=interval, record=record,
                should_abort=self._stage_guard(index, stage.weight, interval, probes,
                                               data_checks),
                sleep=ctx.sleep)
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
        to roll back (a request, a side that stopped answering), or None once closed."""
        ctx = self.ctx
        remaining = closes - time.time()
        stage = len(ctx.cfg.canary.stages)
        with self.probes(ctx.cfg.canary.interval, blue_too=False) as probes:
            # A stop (signal, deadline) ends the wait; the release stays promoted.
            while remaining > 0 and not ctx.stop.stop_waiting():
                reason = ctx.journal.rollback_requested() or self._probe_problem(
                    probes, stage, 100)
                if reason:
                    return reason
                ctx.sleep(min(REQUEST_POLL_S, remaining))
                remaining = closes - time.time()
        return None

    # ------------------------------------------------------------------- guard

    @contextmanager
    def probes(self, interval: float, *, blue_too: bool) -> Iterator[list[SideProbe]]:
        """Green's (and blue's) own health, probed in the background for a stage or
        the window: a paused server is invisible to Prometheus."""
        cfg = self.ctx.cfg
        sides = [(self.ctx.green_endpoint, "green")] + (
            [(self.ctx.blue_endpoint, "blue")] if blue_too else [])
        probe = cfg.canary.probe
        probes = [SideProbe(db, side, interval=probe.interval or interval,
                            timeout=probe.timeout, failure_limit=probe.failure_limit)
                  for db, side in sides]
        with ExitStack() as stack:
            for each in probes:
                stack.enter_context(each)
            yield probes

    def _probe_problem(self, probes: list[SideProbe], index: int, weight: int) -> str | None:
        for probe in probes:
            for result in probe.drain():
                self.ctx.journal.measure(
                    stage=index, weight=weight, check=f"probe:{result.side}",
                    value=round(result.seconds, 4), baseline=self.ctx.cfg.canary.probe.timeout,
                    verdict="pass" if result.ok else "fail", detail=result.detail)
                if not result.ok:
                    self.ctx.note(f"{result.side} probe failed: {result.detail}", "warning")
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
        running: list[Future[ReplicationCheck]] = []

        def guard() -> str | None:
            reason = self.ctx.journal.rollback_requested() or self.ctx.stop.check()
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
            running.append(data_checks.submit(self.pair.health, index))
            return None

        return guard

    def _record_replication_check(self, check: ReplicationCheck, index: int,
                                  weight: int) -> str | None:
        """On the machine's thread: the store's connection is not shared."""
        if check.postponed:
            # One blip is not a verdict: the probes count failures against their
            # limit and fail the stage; this check waits for the next interval.
            self.ctx.note(f"replication check postponed: {check.postponed}", "warning")
            return None
        max_lag = self.ctx.cfg.sync.max_lag_bytes
        for what, lag in check.lags:
            over = lag is not None and lag > max_lag
            self.ctx.journal.measure(
                stage=index, weight=weight, check=f"replication-lag:{what}",
                value=None if lag is None else float(lag), baseline=float(max_lag),
                verdict="inconclusive" if over else "pass",
                detail="slot lag in bytes (WAL the subscriber has not confirmed)")
        return check.problem
