"""The live view drawn from a ``ViewModel``: a pure function of the model and the
time, so a test renders it with ``Console(record=True)`` and reads the text."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from orchestrator.live.model import LAG_PREFIX, Reading, ViewModel

_VERDICT_STYLE = {"pass": "green", "fail": "bold red", "inconclusive": "yellow"}
_DIRECTIONS = {"forward": "forward (blue → green)", "reverse": "reverse (green → blue)"}
_STATUS_STYLE = {"running": "cyan", "promoted": "green", "rolled_back": "yellow",
                 "failed": "bold red"}


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def number(value: float | None) -> str:
    return "no data" if value is None else f"{value:.4g}"


def size(value: float | None) -> str:
    if value is None:
        return "unknown"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(amount) < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"  # pragma: no cover - the loop returns


def render(model: ViewModel, now: float) -> RenderableType:
    if not model.started:
        return Panel(Text(f"release {model.release} has not started; waiting"),
                     title=f"release {model.release}", title_align="left")
    parts: list[RenderableType] = [_header(model, now), *_measured(model)]
    for bar in model.progress.values():
        line = Table.grid(padding=(0, 2))
        line.add_row(Text(bar.description, style="bold"),
                     ProgressBar(total=bar.total or 1, completed=bar.done, width=30),
                     f"{bar.done:.0f}/{bar.total:.0f}")
        parts.append(line)
    title = Text.assemble(f"release {model.release} · ",
                          (model.status, _STATUS_STYLE.get(model.status, "")))
    return Panel(Group(*parts), title=title, title_align="left")


def _header(model: ViewModel, now: float) -> Table:
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold", no_wrap=True)
    rows.add_column()
    rows.add_row("states", _timeline(model, now))
    window_left = model.window_left(now)
    if window_left is not None:
        rows.add_row("window", f"promoted · rollback window {duration(window_left)} left")
    stage = _stage_line(model, now)
    if stage is not None:
        rows.add_row("stage", stage)
    if model.green_weight is not None:
        rows.add_row("traffic", f"blue {100 - model.green_weight}% / green "
                                f"{model.green_weight}%")
    if model.reason:
        rows.add_row("reason", Text(model.reason, style="yellow"))
    if model.stale:
        rows.add_row("stale", Text(model.stale, style="bold red"))
    return rows


def _measured(model: ViewModel) -> list[RenderableType]:
    """The checks, the lag per direction, the probes and hooks: a table each."""
    readings = sorted(model.readings.items())
    side = ("probe:", "hook:")
    checks = [r for name, r in readings if not name.startswith((LAG_PREFIX, *side))]
    lags = [r for name, r in readings if name.startswith(LAG_PREFIX)]
    others = [r for name, r in readings if name.startswith(side)]
    tables: list[RenderableType] = []
    if checks or model.limits:
        tables.append(_checks(model, checks))
    if lags:
        tables.append(_lags(lags))
    if others:
        tables.append(_others(others))
    return tables


def _timeline(model: ViewModel, now: float) -> Text:
    text = Text()
    for i, span in enumerate(model.timeline):
        if i:
            text.append(" → ", style="dim")
        if span.duration_s is None:
            running = now - span.started if span.started is not None else 0.0
            text.append(f"{span.state} {duration(running)}…", style="bold cyan")
        elif span.interrupted:
            text.append(f"{span.state} {duration(span.duration_s)} ✗", style="bold red")
        elif span.state == "preflight":
            text.append("preflight ✓", style="green")
        else:
            text.append(f"{span.state} {duration(span.duration_s)}", style="green")
    last = model.timeline[-1] if model.timeline else None
    if model.state and (last is None or (last.duration_s is not None
                                         and last.state != model.state)):
        if model.timeline:
            text.append(" → ", style="dim")
        text.append(model.state, style=_STATUS_STYLE.get(model.status, "bold"))
    return text


def _stage_line(model: ViewModel, now: float) -> Text | None:
    total = len(model.stages)
    if model.state != "canary":
        return None
    if model.stage is None:
        return Text(f"?/{total} (starting)")
    weight, length = model.stages[model.stage - 1]
    line = Text(f"{model.stage}/{total} · {weight}% to green")
    if model.awaiting:
        line.append(f" · waiting for approval of {model.awaiting}: `orchestrate promote`",
                    style="bold yellow")
    else:
        left = model.stage_left(now)
        if left is not None:
            line.append(f" · {duration(left)} left of {duration(length)}")
    return line


def _verdict(reading: Reading) -> Text:
    return Text(reading.verdict.upper() if reading.verdict == "fail" else reading.verdict,
                style=_VERDICT_STYLE.get(reading.verdict, ""))


def _where(reading: Reading) -> str:
    return "window" if reading.stage is None else f"stage {reading.stage}"


def _checks(model: ViewModel, readings: list[Reading]) -> Table:
    table = Table(title="checks", title_justify="left", box=None, padding=(0, 2),
                  show_edge=False)
    for column in ("check", "value", "blue", "limit", "verdict", "at"):
        table.add_column(column, no_wrap=True)
    seen = set()
    for r in readings:
        seen.add(r.name)
        table.add_row(r.name, number(r.value), "" if r.baseline is None else number(r.baseline),
                      model.limits.get(r.name, ""), _verdict(r), _where(r))
    for name, limit in model.limits.items():
        if name not in seen:
            table.add_row(name, "not measured yet", "", limit, "", "")
    return table


def _lags(readings: list[Reading]) -> Table:
    table = Table(title="replication lag", title_justify="left", box=None, padding=(0, 2),
                  show_edge=False)
    for column in ("direction", "lag", "limit", "verdict", "at"):
        table.add_column(column, no_wrap=True)
    for r in readings:
        direction = r.name.partition(":")[2] or r.name
        # Bytes unless the measurement says it counts seconds.
        show = size if "seconds" not in r.name else (
            lambda v: "unknown" if v is None else duration(v))
        table.add_row(_DIRECTIONS.get(direction, direction), show(r.value),
                      "" if r.baseline is None else show(r.baseline), _verdict(r), _where(r))
    return table


def _others(readings: list[Reading]) -> Table:
    table = Table(title="probes and hooks", title_justify="left", box=None, padding=(0, 2),
                  show_edge=False)
    for column in ("name", "value", "verdict", "at"):
        table.add_column(column, no_wrap=True)
    for r in readings:
        shown = f"{r.value:.3f}s" if r.name.startswith("probe:") and r.value is not None \
            else number(r.value)
        table.add_row(r.name, shown, _verdict(r), _where(r))
    return table
