"""The live view's model and renderer: a model in, the text a person would read out
(rich's recording console), no terminal and no database."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from orchestrator.config import parse_config
from orchestrator.events import Event, Kind
from orchestrator.live import LiveView, make_display, sinks_for
from orchestrator.live.model import Reading, Span, ViewModel
from orchestrator.live.render import render
from orchestrator.store import StateStore
from orchestrator.ui import NoDisplay
from tests.unit.test_config import minimal

STAGES = [(0, 30.0), (5, 60.0), (20, 60.0), (100, 60.0)]


def text(model: ViewModel, now: float, width: int = 110) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render(model, now))
    return console.export_text()


def lines_with(output: str, *words: str) -> list[str]:
    return [line for line in output.splitlines() if all(w in line for w in words)]


def test_the_view_shows_the_stage_each_check_against_its_limit_and_lag_per_direction(
) -> None:
    model = ViewModel("rel-1", STAGES, limits={"error-rate": "<= 0.05",
                                               "latency-p99": "<= blue + 0.1"},
                      state="canary", stage=2, stage_started=100.0, green_weight=5,
                      timeline=[Span("preflight", None, 0.0), Span("backup", 0.0, 1.5),
                                Span("canary", 90.0)])
    model.readings = {
        "error-rate": Reading("error-rate", 0.012, None, "pass", 2, 110.0),
        "latency-p99": Reading("latency-p99", 0.8, 0.3, "fail", 2, 110.0),
        "replication-lag:forward": Reading("replication-lag:forward", 2048, 1 << 20,
                                           "pass", 2, 110.0),
        "replication-lag:reverse": Reading("replication-lag:reverse", 3 << 20, 1 << 20,
                                           "inconclusive", 2, 110.0),
    }
    out = text(model, now=120.0)

    assert lines_with(out, "stage", "2/4", "5% to green", "40s left of 1m00s")
    assert lines_with(out, "traffic", "blue 95% / green 5%")
    assert lines_with(out, "backup 1.5s", "canary 30s…")
    assert lines_with(out, "error-rate", "0.012", "<= 0.05", "pass", "stage 2")
    assert lines_with(out, "latency-p99", "0.8", "0.3", "<= blue + 0.1", "FAIL", "stage 2")
    assert lines_with(out, "forward (blue → green)", "2.0 KiB", "1.0 MiB", "pass")
    assert lines_with(out, "reverse (green → blue)", "3.0 MiB", "1.0 MiB", "inconclusive")
    # Never the stored 0-based index.
    assert "1/4" not in out and "stage 1" not in out


def test_a_check_not_measured_yet_shows_its_limit() -> None:
    model = ViewModel("rel-1", STAGES, limits={"error-rate": "<= 0.05"}, state="canary")
    out = text(model, now=0.0)
    assert lines_with(out, "error-rate", "not measured yet", "<= 0.05")
    assert lines_with(out, "stage", "?/4")


def event(kind: Kind, at: float, **fields: object) -> Event:
    return Event(kind, "rel-1", at=at, **fields)  # type: ignore[arg-type]


def test_events_build_the_model_with_one_based_stages() -> None:
    model = ViewModel("rel-1", STAGES, limits={"error-rate": "<= 0.05"}, window_s=600.0)
    for e in [
        event(Kind.STARTED, 1.0, state="backup"),
        event(Kind.STATE, 1.0, state="backup"),
        event(Kind.STATE_DONE, 3.0, state="backup", details={"duration_s": 2.0}),
        event(Kind.STATE, 3.0, state="canary"),
        event(Kind.STAGE_PASSED, 33.0, state="canary", stage=1, stages=4, weight=0),
        # The journal emits stage numbers 1-based: this one is the second stage.
        event(Kind.MEASUREMENT, 43.0, stage=2, weight=5, details={
            "check": "error-rate", "value": 0.5, "baseline": None, "verdict": "fail"}),
    ]:
        model.apply(e)
    assert (model.state, model.stage, model.green_weight) == ("canary", 2, 5)
    assert model.stage_left(63.0) == 30.0
    out = text(model, now=63.0)
    assert lines_with(out, "stage", "2/4", "5% to green", "30s left")
    assert lines_with(out, "error-rate", "0.5", "FAIL", "stage 2")

    model.apply(event(Kind.ROLLING_BACK, 64.0, state="canary", reason="check failed"))
    model.apply(event(Kind.STATE, 64.0, state="rollback"))
    assert not model.finished
    # The canary ended badly: one span, stopped, not still ticking.
    canary = [s for s in model.timeline if s.state == "canary"]
    assert len(canary) == 1 and canary[0].interrupted and canary[0].duration_s == 61.0
    model.apply(event(Kind.STATE_DONE, 66.0, state="rollback", details={"duration_s": 2.0}))
    model.apply(event(Kind.ROLLED_BACK, 66.0, state="rolled_back", reason="check failed"))
    assert model.finished and model.status == "rolled_back" and model.green_weight == 0
    out = text(model, now=70.0)
    assert lines_with(out, "canary 1m01s ✗", "rollback 2.0s", "rolled_back")
    assert "…" not in out
    assert lines_with(out, "reason", "check failed")
    assert lines_with(out, "release rel-1", "rolled_back")


def test_the_window_shows_its_time_left_and_measurements_after_the_last_stage() -> None:
    model = ViewModel("rel-1", STAGES, window_s=1800.0)
    model.apply(event(Kind.STATE, 0.0, state="promote"))
    model.apply(event(Kind.STATE_DONE, 1.0, state="promote", details={"duration_s": 1.0}))
    model.apply(event(Kind.PROMOTED, 1.0, state="window"))
    model.apply(event(Kind.STATE, 1.0, state="window"))
    # The window's probes are recorded one past the last stage (index 4, 1-based 5).
    model.apply(event(Kind.MEASUREMENT, 2.0, stage=5, weight=100, details={
        "check": "probe:green", "value": 0.004, "baseline": 5.0, "verdict": "pass"}))
    out = text(model, now=601.0)
    assert lines_with(out, "promoted", "rollback window 20m00s left")
    assert lines_with(out, "probe:green", "0.004s", "pass", "window")
    assert "5/4" not in out and "stage 5" not in out
    assert lines_with(out, "traffic", "blue 0% / green 100%")


def test_the_live_view_redraws_in_place_and_stops_cleanly() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    view = LiveView(ViewModel("rel-1", STAGES), console=console, clock=lambda: 50.0)
    view.emit(event(Kind.STATE, 0.0, state="canary"))
    view.progress("copy", "initial copy (bytes)", 50, 200)
    view.emit(event(Kind.MEASUREMENT, 10.0, stage=1, weight=0, details={
        "check": "probe:green", "value": 0.002, "baseline": 5.0, "verdict": "pass"}))
    view.close()
    view.close()  # twice: the machine's finally and a Ctrl-C both may
    written = out.getvalue()
    assert "\x1b[?25l" in written and "\x1b[?25h" in written  # cursor hidden, then shown
    assert "1/4 · 0% to green" in written
    assert "initial copy (bytes)" in written


def test_off_a_terminal_there_is_no_view_and_no_sink(tmp_path: Path) -> None:
    cfg = parse_config(minimal(), base_dir=tmp_path)
    # Console logs asked for, but stderr is pytest's capture, not a terminal.
    for fmt in ("json", "console"):
        display = make_display(fmt, cfg)
        assert isinstance(display, NoDisplay)
        # A display that is no view brings no sink, and reads nothing to say so.
        assert sinks_for(display, cfg, StateStore.for_config(cfg)) == []
