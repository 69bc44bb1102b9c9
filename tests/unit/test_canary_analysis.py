"""Stage evaluation: thresholds, comparison with blue, no data is not success."""

from __future__ import annotations

from orchestrator.canary.analysis import Evaluation, evaluate, render, run_stage
from orchestrator.canary.metrics import FakeMetrics
from orchestrator.config import MetricCheck

ERR = MetricCheck(name="error-rate", query='rate(errors{colour="$colour"}[$window])', max=0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def stage(
    source: FakeMetrics, checks: list[MetricCheck], duration: float = 30.0, abort: str | None = None
) -> tuple[str, list[Evaluation]]:
    clock = Clock()
    seen: list[Evaluation] = []
    out = run_stage(
        checks,
        source,
        {"window": "30s"},
        duration=duration,
        interval=5.0,
        record=seen.append,
        should_abort=lambda: abort,
        clock=clock,
        sleep=clock.sleep,
    )
    return out.verdict, seen


def test_template_keeps_promql_braces() -> None:
    q = render(ERR.query, {"window": "30s"}, "green")
    assert q == 'rate(errors{colour="green"}[30s])'


def test_pass_when_within_threshold_for_the_whole_stage() -> None:
    verdict, seen = stage(FakeMetrics({'colour="green"': 0.01}), [ERR])
    assert verdict == "pass"
    assert len(seen) == 6  # t = 5, 10, ..., 30: one interval in, then every interval
    assert all(e.verdict == "pass" for e in seen)


def test_breach_fails_at_failure_limit() -> None:
    check = ERR.model_copy(update={"failure_limit": 2})
    verdict, seen = stage(FakeMetrics({'colour="green"': 0.2}), [check])
    assert verdict == "fail"
    assert [e.verdict for e in seen] == ["fail", "fail"]


def test_no_data_is_inconclusive_never_pass() -> None:
    verdict, seen = stage(FakeMetrics({}), [ERR])
    assert verdict == "inconclusive"
    assert len(seen) == ERR.inconclusive_limit


def test_prometheus_down_is_inconclusive() -> None:
    source = FakeMetrics({'colour="green"': 0.0})
    source.down = True
    ev = evaluate(ERR, source, {"window": "30s"})
    assert ev.verdict == "inconclusive" and "down" in ev.detail


def test_comparison_with_blue_tolerates_a_bad_hour_for_everyone() -> None:
    check = MetricCheck(
        name="err-vs-blue", query='err{colour="$colour"}', max_increase_over_blue=0.01
    )
    everyone_bad = FakeMetrics({'colour="green"': 0.10, 'colour="blue"': 0.095})
    assert evaluate(check, everyone_bad, {}).verdict == "pass"
    green_worse = FakeMetrics({'colour="green"': 0.10, 'colour="blue"': 0.01})
    ev = evaluate(check, green_worse, {})
    assert ev.verdict == "fail" and ev.baseline == 0.01


def test_stage_without_checks_waits_its_duration() -> None:
    clock = Clock()
    out = run_stage([], FakeMetrics(), {}, duration=12.0, interval=5.0, record=lambda e: None,
                    should_abort=lambda: None, clock=clock, sleep=clock.sleep)
    assert out.verdict == "pass" and clock.now == 12.0


def test_abort_request_stops_the_stage() -> None:
    verdict, seen = stage(FakeMetrics({'colour="green"': 0.0}), [ERR], abort="alert fired")
    assert verdict == "aborted" and seen == []


def test_comparison_for_lower_is_worse_values() -> None:
    """A success rate: green may be at most 0.01 below blue's."""
    check = MetricCheck(
        name="success-vs-blue", query='ok{colour="$colour"}', max_decrease_from_blue=0.01
    )
    assert evaluate(check, FakeMetrics({'colour="green"': 0.90, 'colour="blue"': 0.905}),
                    {}).verdict == "pass"
    ev = evaluate(check, FakeMetrics({'colour="green"': 0.90, 'colour="blue"': 0.99}), {})
    assert ev.verdict == "fail" and "< blue" in ev.detail


def test_baseline_query_selects_blue_when_colour_cannot() -> None:
    check = MetricCheck(name="nginx", query='r{canary!=""}', baseline_query='r{canary=""}',
                        max_increase_over_blue=0.01)
    source = FakeMetrics({'canary!=""': 0.05, 'canary=""': 0.045})
    ev = evaluate(check, source, {})
    assert ev.verdict == "pass" and ev.baseline == 0.045
    assert source.queries == ['r{canary!=""}', 'r{canary=""}']


def test_comparison_without_blue_data_is_inconclusive() -> None:
    check = MetricCheck(name="c", query='x{colour="$colour"}', max_decrease_from_blue=0.01)
    ev = evaluate(check, FakeMetrics({'colour="green"': 0.9}), {})
    assert ev.verdict == "inconclusive" and "blue" in ev.detail


def test_rollback_request_wakes_the_stage_within_a_poll() -> None:
    """The wait between evaluations asks for a rollback request every `poll` seconds:
    a request arriving 1.2 s into a 30 s interval acts at 1.5 s, not at 30 s."""
    clock = Clock()
    out = run_stage([ERR], FakeMetrics({'colour="green"': 0.0}), {"window": "30s"},
                    duration=300.0, interval=30.0, record=lambda e: None,
                    should_abort=lambda: "alert" if clock.now >= 1.2 else None,
                    clock=clock, sleep=clock.sleep, poll=0.5)
    assert out.verdict == "aborted" and out.reason == "alert"
    assert clock.now == 1.5
    assert out.evaluations == []
