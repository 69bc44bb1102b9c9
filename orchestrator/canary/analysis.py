"""Evaluating a stage: every interval, each check's query against its threshold.

A check fails the stage after ``failure_limit`` failed evaluations; a check with
no data (or Prometheus unreachable) is inconclusive, and ``inconclusive_limit``
inconclusive evaluations end the stage as inconclusive: never as a pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from string import Template

from orchestrator.canary.metrics import MetricsSource, MetricsUnavailable
from orchestrator.config import MetricCheck

# How often a stage asks whether a rollback was requested while it waits for its next
# evaluation: one cheap query on the control schema, and a reaction within a second.
ABORT_POLL_S = 0.5


@dataclass(frozen=True)
class Evaluation:
    check: str
    value: float | None
    baseline: float | None
    verdict: str  # pass / fail / inconclusive
    detail: str


@dataclass
class StageOutcome:
    verdict: str  # pass / fail / inconclusive / aborted
    reason: str = ""
    evaluations: list[Evaluation] = field(default_factory=list)


def format_window(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))}s"


def render(query: str, labels: dict[str, str], colour: str) -> str:
    """``query`` filled in for one side. ``labels`` comes from
    ``ReleaseConfig.template_variables`` (which documents the precedence); the side's
    ``$colour`` and ``$other_colour`` are set last and win over everything."""
    other = "blue" if colour == "green" else "green"
    # A database pair (``orchestrator.pairing``) names each role's application.
    values = {**labels, "colour": labels.get(f"colour_of_{colour}", colour),
              "other_colour": labels.get(f"colour_of_{other}", other)}
    return Template(query).safe_substitute(values)


def evaluate(check: MetricCheck, source: MetricsSource, labels: dict[str, str]) -> Evaluation:
    try:
        value, baseline = _measure(check, source, labels)
    except MetricsUnavailable as exc:
        return Evaluation(check.name, None, None, "inconclusive", exc.message)
    if value is None:
        return Evaluation(check.name, None, baseline, "inconclusive", "no data for green")
    if check.compares_with_blue and baseline is None:
        if check.blue_idle is None:
            return Evaluation(check.name, value, None, "inconclusive", "no data for blue")
        # Blue serves nobody (100 %, the rollback window): green is judged on the limits
        # configured for exactly that, never passed for want of a comparison.
        idle = check.blue_idle
        problems = [*_bound_problems(check, value),
                    *_limits(value, idle.max, idle.min, "blue idle: ")]
        if problems:
            return Evaluation(check.name, value, None, "fail", "; ".join(problems))
        return Evaluation(check.name, value, None, "pass",
                          "no data for blue: within the blue_idle limits")
    problems = [*_bound_problems(check, value), *_blue_problems(check, value, baseline)]
    if problems:
        return Evaluation(check.name, value, baseline, "fail", "; ".join(problems))
    return Evaluation(check.name, value, baseline, "pass", "within limits")


def _measure(check: MetricCheck, source: MetricsSource,
             labels: dict[str, str]) -> tuple[float | None, float | None]:
    """Green's value, and blue's when the check compares with it."""
    value = _number(source.query(render(check.query, labels, "green")))
    baseline = None
    if check.compares_with_blue:
        baseline = _number(source.query(render(check.baseline_query or check.query,
                                                labels, "blue")))
    return value, baseline


def _number(value: float | None) -> float | None:
    # Every comparison with NaN is false, so a NaN would pass any limit: it is no data,
    # whichever source let it through.
    return None if value is None or math.isnan(value) else value


def _bound_problems(check: MetricCheck, value: float) -> list[str]:
    return _limits(value, check.max, check.min)


def _limits(value: float, high: float | None, low: float | None,
            prefix: str = "") -> list[str]:
    problems = []
    if high is not None and value > high:
        problems.append(f"{prefix}{value:.4g} > max {high:.4g}")
    if low is not None and value < low:
        problems.append(f"{prefix}{value:.4g} < min {low:.4g}")
    return problems


def _blue_problems(check: MetricCheck, value: float, baseline: float | None) -> list[str]:
    if baseline is None:
        return []
    problems = []
    if (check.max_increase_over_blue is not None
            and value > baseline + check.max_increase_over_blue):
        problems.append(f"{value:.4g} > blue {baseline:.4g} + "
                        f"{check.max_increase_over_blue:.4g}")
    if (check.max_decrease_from_blue is not None
            and value < baseline - check.max_decrease_from_blue):
        problems.append(f"{value:.4g} < blue {baseline:.4g} - "
                        f"{check.max_decrease_from_blue:.4g}")
    # Blue at 0 allows only 0: "no worse than 1.5 x nothing" is nothing.
    if check.max_ratio_to_blue is not None and value > baseline * check.max_ratio_to_blue:
        problems.append(f"{value:.4g} > {check.max_ratio_to_blue:g} x blue {baseline:.4g}")
    return problems


def run_stage(
    checks: list[MetricCheck],
    source: MetricsSource,
    labels: dict[str, str],
    *,
    duration: float,
    interval: float,
    record: Callable[[Evaluation], None],
    should_abort: Callable[[], str | None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll: float = ABORT_POLL_S,
) -> StageOutcome:
    """Evaluate every ``interval`` until ``duration`` has passed or a limit is reached.

    The first evaluation comes one interval into the stage: before that, the rate
    windows mostly describe the previous stage's traffic. While waiting between
    evaluations ``should_abort`` is asked every ``poll`` seconds, so that a rollback
    requested by an alert or an operator acts within a second rather than at the
    next evaluation.
    """
    outcome = StageOutcome("pass")
    failures: dict[str, int] = {}
    inconclusive: dict[str, int] = {}
    started = clock()

    def wait(seconds: float) -> str | None:
        deadline = clock() + seconds
        while True:
            reason = should_abort()
            if reason:
                return reason
            remaining = deadline - clock()
            if remaining <= 0:
                return None
            sleep(min(poll, remaining))

    while True:
        reason = should_abort()
        if reason:
            outcome.verdict, outcome.reason = "aborted", reason
            return outcome
        elapsed = clock() - started
        if elapsed >= duration:
            return outcome
        reason = wait(min(interval, duration - elapsed))
        if reason:
            outcome.verdict, outcome.reason = "aborted", reason
            return outcome
        for check in checks:
            ev = evaluate(check, source, labels)
            outcome.evaluations.append(ev)
            record(ev)
            if ev.verdict == "fail":
                failures[check.name] = failures.get(check.name, 0) + 1
                if failures[check.name] >= check.failure_limit:
                    outcome.verdict = "fail"
                    outcome.reason = f"check {check.name} failed: {ev.detail}"
                    return outcome
            elif ev.verdict == "inconclusive":
                inconclusive[check.name] = inconclusive.get(check.name, 0) + 1
                if inconclusive[check.name] >= check.inconclusive_limit:
                    outcome.verdict = "inconclusive"
                    outcome.reason = (f"check {check.name} was inconclusive "
                                      f"{inconclusive[check.name]} times: {ev.detail}")
                    return outcome
