"""The live view against the real machine and the real store: the model a run's
events build, the same model read back by `status --watch`, and the watch ending
when the release does."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from orchestrator.cli import cli
from orchestrator.config import ReleaseConfig, load_config
from orchestrator.errors import STOPPED_EXIT
from orchestrator.events import Event, Events, Kind
from orchestrator.live import LiveView, sinks_for, watch
from orchestrator.live.model import ViewModel, from_store
from orchestrator.live.render import render
from orchestrator.machine import Release
from orchestrator.record import State, Status, config_digest
from orchestrator.routers.base import Weights
from orchestrator.store import StateStore
from orchestrator.wiring import release_for
from tests.local_http import LocalServer, QuietHandler
from tests.machine.conftest import SWITCHED_OVER, FakeSleep, Pair

FOUR_STAGES = {"canary": {"stages": [
    {"weight": 0, "duration": 0}, {"weight": 5, "duration": "1m"},
    {"weight": 20, "duration": "1m"}, {"weight": 100, "duration": "1m"}]}}


def shown(renderable: object, width: int = 120) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_the_live_model_follows_a_run_and_status_reads_the_same(pair: Pair) -> None:
    cfg = pair.config(canary={"stages": [{"weight": 0, "duration": 0},
                                         {"weight": 100, "duration": "300ms"}]})
    pair.seed(cfg, State.CANARY, **{**SWITCHED_OVER, "stage": 0})
    pair.router.weights = Weights.green_at(0)
    pair.metrics.values = {"app_errors": 0.01}
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    view = LiveView(ViewModel.for_config(cfg), console=console)
    store = pair.store(cfg)

    outcome = Release(cfg, store=store, router=pair.router, metrics=pair.metrics,
                      sleep=FakeSleep(limit=100_000), display=view,
                      events=Events([view])).run()

    assert (outcome.state, outcome.status) == (State.WINDOW, Status.PROMOTED)
    model = view.model
    assert (model.state, model.status, model.stage, model.green_weight) == (
        "window", "promoted", 2, 100)
    assert [s.state for s in model.timeline] == ["canary", "promote", "window"]
    assert all(s.duration_s is not None for s in model.timeline[:2])
    error_rate = model.readings["error-rate"]
    assert (error_rate.value, error_rate.verdict, error_rate.stage) == (0.01, "pass", 2)
    assert model.limits == {"error-rate": "<= 0.05"}
    live_text = shown(view.renderable())
    assert "rollback window" in live_text and "error-rate" in live_text

    # `status --watch` rebuilds it from the control schema: the same facts.
    stored = from_store(pair.store(cfg), cfg)
    assert (stored.state, stored.status, stored.green_weight) == ("window", "promoted", 100)
    assert [s.state for s in stored.timeline] == ["canary", "promote", "window"]
    again = stored.readings["error-rate"]
    assert (again.value, again.verdict, again.stage) == (0.01, "pass", 2)
    stored_text = shown(render(stored, time.time()))
    for line in live_text.splitlines():
        if "error-rate" in line:
            assert line in stored_text


def seeded(pair: Pair) -> tuple[ReleaseConfig, StateStore]:
    """A release in its second of four stages, with two checks' and both directions'
    lag measured (stored 0-based: index 1 is stage 2)."""
    cfg = pair.config(**FOUR_STAGES)
    store = pair.seed(cfg, State.CANARY, **{**SWITCHED_OVER, "stage": 1,
                                            "weights": Weights.green_at(5)})
    name = cfg.release.name
    store.log(name, "info", "stage 2/4: 5% to green", details={"duration_s": 60})
    store.record_measurement(name, stage=1, weight=5, check="error-rate", value=0.2,
                             baseline=None, verdict="fail", detail="0.2 > max 0.05")
    for what, lag in (("forward", 4096.0), ("reverse", 0.0)):
        store.record_measurement(name, stage=1, weight=5, check=f"replication-lag:{what}",
                                 value=lag, baseline=float(cfg.sync.max_lag_bytes),
                                 verdict="pass")
    return cfg, store


def finish_later(pair: Pair, cfg: ReleaseConfig, after: float = 0.0) -> threading.Thread:
    """Another process rolls the release back while the watch runs."""
    def finish() -> None:
        time.sleep(after)
        other = StateStore.for_config(cfg)
        try:
            other.set_state(cfg.release.name, State.ROLLED_BACK, status=Status.ROLLED_BACK)
        finally:
            other.close()

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


def test_status_watch_ends_when_the_release_does(pair: Pair,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg, store = seeded(pair)
    finisher = finish_later(pair, cfg, after=1.0)
    started = time.monotonic()
    code = watch(cfg, store, interval=0.1, tty=False)
    finisher.join()
    assert code == 1  # rolled back
    assert time.monotonic() - started < 5
    snapshots = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first, last = snapshots[0], snapshots[-1]
    assert (first["state"], first["stage"], first["green_weight"]) == ("canary", 2, 5)
    assert first["readings"]["error-rate"]["stage"] == 2
    assert first["readings"]["replication-lag:forward"]["value"] == 4096.0
    assert (last["state"], last["status"]) == ("rolled_back", "rolled_back")


def test_status_watch_on_a_terminal_redraws_until_the_end(pair: Pair) -> None:
    cfg, store = seeded(pair)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    finisher = finish_later(pair, cfg, after=1.0)
    code = watch(cfg, store, interval=0.1, console=console)
    finisher.join()
    assert code == 1
    written = out.getvalue()
    assert "2/4 · 5% to green" in written
    assert "forward (blue → green)" in written and "reverse (green → blue)" in written
    # Drawn more than once, in place: the cursor moved up over the previous frame.
    assert written.count("\x1b[2K") > 20
    assert "rolled_back" in written


def config_file(cfg: ReleaseConfig, base: Path) -> Path:
    path = base / "release.yaml"
    path.write_text(yaml.safe_dump(config_digest(cfg)[1]))
    return path


def test_status_watch_off_a_terminal_prints_json_lines(pair: Pair) -> None:
    cfg, _ = seeded(pair)
    path = config_file(cfg, pair.base)
    finisher = finish_later(pair, cfg, after=1.0)
    result = CliRunner().invoke(cli, ["--log-format", "json", "status", "-c", str(path),
                                      "--watch", "--interval", "0.1"])
    finisher.join()
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert len(lines) >= 2
    assert [json.loads(line)["state"] for line in (lines[0], lines[-1])] == [
        "canary", "rolled_back"]


def test_a_release_off_a_terminal_logs_json_lines_and_no_view(pair: Pair) -> None:
    # The release is seeded from the file the CLI reads: its digest must match.
    path = config_file(pair.config(), pair.base)
    cfg = load_config(path)
    pair.seed(cfg, State.CANARY, mode="switchover", majors={"blue": 15, "green": 15},
              stage=0)
    result = CliRunner().invoke(cli, ["rollback", "-c", str(path), "--reason", "test"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout.splitlines()[-1].startswith(f"release {cfg.release.name}: ROLLED BACK")
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(e["event"] == "rolling back" for e in logged)
    assert "\x1b[" not in result.stderr + result.stdout


def in_a_terminal(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    """The CLI with a pseudo-terminal for stdin, stdout and stderr."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "60", "TERM": "xterm-256color"}
    for forces_json in ("CI", "ORCHESTRATE_LOG_FORMAT", "KUBERNETES_SERVICE_HOST"):
        env.pop(forces_json, None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args],
                            stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    return proc, leader


def read_all(leader: int, *, once_shown: str = "",
             then: Callable[[], object] | None = None) -> str:
    """Everything the child writes; ``then`` runs once ``once_shown`` has appeared (a
    fixed delay would race a slow start of the child on a loaded machine)."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
        if then is not None and once_shown in b"".join(chunks).decode(errors="replace"):
            then()
            then = None
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


class FakePrometheus(QuietHandler):
    """Answers every instant query with one series: 1 for preflight's vector(1),
    0.01 for a check."""

    def do_GET(self) -> None:
        value = "1" if "vector" in self.path else "0.01"
        body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [0, value]}]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


@pytest.fixture
def prometheus() -> Iterator[str]:
    server = LocalServer(FakePrometheus)
    try:
        yield server.url
    finally:
        server.close()


def at_its_last_stage(pair: Pair, prometheus: str, duration: str) -> tuple[ReleaseConfig,
                                                                           Path]:
    path = config_file(pair.config(prometheus={"url": prometheus}, canary={
        "interval": "300ms", "stages": [{"weight": 0, "duration": 0},
                                        {"weight": 100, "duration": duration}]}), pair.base)
    cfg = load_config(path)
    # Resumed at its last stage (the CLI's own fake router starts at blue 100 %).
    pair.seed(cfg, State.CANARY, **{**SWITCHED_OVER, "stage": 1,
                                    "weights": Weights.green_at(0),
                                    "weights_target": Weights.green_at(0)})
    return cfg, path


def test_ctrl_c_during_a_release_leaves_the_terminal_sane(pair: Pair, prometheus: str
                                                          ) -> None:
    cfg, path = at_its_last_stage(pair, prometheus, "1m")
    proc, leader = in_a_terminal("release", "-c", str(path))
    written = read_all(leader, once_shown="error-rate", then=lambda: threading.Timer(
        0.5, proc.send_signal, (signal.SIGINT,)).start())
    # Ctrl-C with users on green rolls back (the stop's rule): exit 4, traffic on blue.
    assert proc.wait(timeout=60) == STOPPED_EXIT, written
    assert written.rfind("\x1b[?25h") > written.rfind("\x1b[?25l")  # cursor shown again
    assert "ROLLED BACK" in written and "SIGINT received" in written
    assert pair.row(cfg).state == State.ROLLED_BACK


def test_release_in_a_real_terminal_draws_the_view_with_the_logs(pair: Pair,
                                                                  prometheus: str) -> None:
    cfg, path = at_its_last_stage(pair, prometheus, "2s")
    proc, leader = in_a_terminal("release", "-c", str(path))
    written = read_all(leader)
    assert proc.wait(timeout=60) == 0, written
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", written)
    assert "2/2 · 100% to green" in plain
    assert re.search(r"error-rate\s+0\.01\s+<= 0\.05\s+pass\s+stage 2", plain), plain
    assert "rollback window" in plain
    assert "resuming release" in plain  # the console log lines, through the view's console
    assert written.count("\x1b[1A") > 5  # redrawn in place
    assert written.rfind("\x1b[?25h") > written.rfind("\x1b[?25l")
    assert f"release {cfg.release.name}: promoted (rollback window open)" in plain


@pytest.mark.parametrize("ending", ["rolled back", "ctrl-c"])
def test_status_watch_in_a_real_terminal(pair: Pair, ending: str) -> None:
    """The CLI in a pseudo-terminal: the view is drawn with cursor control, and the
    terminal gets its cursor back when the watch ends, on its own or on Ctrl-C."""

    cfg, _ = seeded(pair)
    path = config_file(cfg, pair.base)
    proc, leader = in_a_terminal("status", "-c", str(path), "--watch", "--interval", "0.2")
    finishers: list[threading.Thread] = []

    def end() -> None:
        if ending == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            finishers.append(finish_later(pair, cfg))

    # A second after the first frame: it has been redrawn a few times by then.
    written = read_all(leader, once_shown="2/4 · 5% to green",
                       then=lambda: threading.Timer(1.0, end).start())
    assert proc.wait(timeout=30) == (130 if ending == "ctrl-c" else 1)
    for finisher in finishers:
        finisher.join()
    assert "2/4 · 5% to green" in written
    assert "\x1b[?25l" in written  # cursor hidden while drawing...
    assert written.rfind("\x1b[?25h") > written.rfind("\x1b[?25l")  # ...and shown again
    assert written.count("\x1b[1A") > 10  # redrawn in place: up over the last frame


def test_status_names_the_windows_measurements_not_a_stage_past_the_last(pair: Pair) -> None:
    path = config_file(pair.config(), pair.base)
    cfg = load_config(path)
    store = pair.seed(cfg, State.WINDOW, status=Status.PROMOTED, promoted_at=time.time(),
                      **{**SWITCHED_OVER, "stage": 2})
    # The window's probes are stored one past the last stage's index (2 of 0..1).
    store.record_measurement(cfg.release.name, stage=2, weight=100, check="probe:green",
                             value=0.003, baseline=2.0, verdict="pass")
    store.record_measurement(cfg.release.name, stage=1, weight=100, check="error-rate",
                             value=0.01, baseline=None, verdict="pass")
    result = CliRunner().invoke(cli, ["status", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "    window (100%) probe:green: 1 evaluations" in result.stdout
    assert "    stage 2 (100%) error-rate: 1 evaluations" in result.stdout
    assert "stage 3" not in result.stdout


def test_a_resumed_release_starts_its_view_from_the_store(pair: Pair) -> None:
    cfg, store = seeded(pair)
    name = cfg.release.name
    store.log(name, "info", "sync done", state="sync", duration_s=3.0)
    store.log(name, "info", "validate done", state="validate", duration_s=1.0)
    view = LiveView(ViewModel.for_config(cfg), console=Console(file=io.StringIO()))
    assert sinks_for(view, cfg, store) == [view]
    model = view.model
    assert (model.state, model.stage, model.green_weight) == ("canary", 2, 5)
    assert [(s.state, s.duration_s) for s in model.timeline] == [
        ("sync", 3.0), ("validate", 1.0), ("canary", None)]
    # What the CLI builds: the view is one of the release's sinks.
    built = release_for(cfg, store=store, display=view)
    assert built.ctx.events.sinks[0] is view  # then the metrics sink
    # The machine starts the canary state again: the same span, not a second one.
    view.emit(Event(Kind.STATE, name, state="canary", at=time.time()))
    view.close()
    assert [s.state for s in view.model.timeline] == ["sync", "validate", "canary"]


def test_the_store_timeline_marks_the_state_a_rollback_left(pair: Pair) -> None:
    cfg, store = seeded(pair)
    name = cfg.release.name
    store.log(name, "info", "validate done", state="validate", duration_s=1.0)
    store.log(name, "warning", "rolling back: check error-rate failed", state="canary")
    store.set_state(name, State.ROLLBACK, status=Status.RUNNING,
                    error="check error-rate failed")
    model = from_store(store, cfg)
    assert [(s.state, s.interrupted) for s in model.timeline] == [
        ("validate", False), ("canary", True), ("rollback", False)]
    out = shown(render(model, time.time()))
    assert "canary" in out and "✗" in out and "rollback" in out
    assert "check error-rate failed" in out


def test_status_watch_output_json_prints_json_lines_even_on_a_terminal(pair: Pair) -> None:
    cfg, _ = seeded(pair)
    path = config_file(cfg, pair.base)
    proc, leader = in_a_terminal("status", "-c", str(path), "--watch", "--interval", "0.2",
                                 "--output", "json")
    finishers: list[threading.Thread] = []
    written = read_all(leader, once_shown='"state": "canary"',
                       then=lambda: finishers.append(finish_later(pair, cfg)))
    assert proc.wait(timeout=30) == 1
    finishers[0].join()
    assert "\x1b[" not in written
    states = [json.loads(line)["state"] for line in written.splitlines() if line.strip()]
    assert states[0] == "canary" and states[-1] == "rolled_back"
