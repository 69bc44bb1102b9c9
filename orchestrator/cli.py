"""The `orchestrate` command line.

Errors a user can hit print what went wrong and what to do, without a traceback
(unless --debug). Exit codes: 0 promoted / ok (or outside every maintenance window:
nothing done), 1 rolled back or failed, 2 bad config or preflight, 3 another
orchestrator holds the release, 4 stopped by the deadline, the window's end or a
signal with all traffic on blue (``orchestrator.interrupts``).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from orchestrator import live, pairing, rollback_request
from orchestrator import logging as logs
from orchestrator import plan as planner
from orchestrator.config import ReleaseConfig, load_config
from orchestrator.errors import Interrupted, OrchestrateError
from orchestrator.interrupts import Stop
from orchestrator.machine import Release
from orchestrator.record import State, Status
from orchestrator.store import ReleaseRow, StateStore
from orchestrator.telemetry import process_telemetry
from orchestrator.wiring import release_for

CONFIG = click.option("--config", "-c", "config_path", type=click.Path(path_type=Path),
                      default=Path("release.yaml"), show_default=True,
                      help="Release configuration (YAML).")
OUTPUT = click.option("--output", type=click.Choice(["text", "json"]), default="text")


def _load(ctx: click.Context, path: Path, *, starting: bool = False) -> ReleaseConfig:
    """The config of this run: named, and with a pair, blue = the live side (the
    store that knows it is kept for the release)."""
    loaded = load_config(path)
    store = StateStore.for_config(loaded)
    cfg = pairing.resolve(loaded, store, starting=starting)
    ctx.obj.update(cfg=cfg, store=store)
    return cfg


def _store(cfg: ReleaseConfig) -> StateStore:
    return StateStore.for_config(cfg)


def _release(ctx: click.Context, cfg: ReleaseConfig, **kw: Any) -> Release:
    return release_for(cfg, display=live.make_display(ctx.obj["fmt"], cfg),
                       store=ctx.obj["store"], **kw)


def _echo_outcome(outcome: Any) -> None:
    if outcome.status == Status.PROMOTED:
        extra = " (rollback window open)" if outcome.state == State.WINDOW else ""
        click.echo(f"release {outcome.name}: promoted{extra}")
    elif outcome.status == Status.ROLLED_BACK:
        click.echo(f"release {outcome.name}: ROLLED BACK: {outcome.error}")
    else:
        click.echo(f"release {outcome.name}: {outcome.status} in state {outcome.state}"
                   + (f": {outcome.error}" if outcome.error else ""))


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--log-format", type=click.Choice(["json", "console"]), default=None,
              help="Log format (default: console on a terminal, JSON otherwise).")
@click.version_option(package_name="orchestrate")
@click.pass_context
def cli(ctx: click.Context, debug: bool, log_format: str | None) -> None:
    """Blue-green and canary releases of PostgreSQL-backed services."""
    fmt = log_format or logs.choose_format()
    logs.configure(debug=debug, fmt=fmt)  # type: ignore[arg-type]
    ctx.ensure_object(dict)
    ctx.obj.update(debug=debug, fmt=fmt)


def _config_command(fn: Callable[..., None]) -> click.Command:
    """A subcommand of ``cli`` that reads ``--config`` (its first option) and is
    called with the click context."""
    return cli.command()(CONFIG(click.pass_context(fn)))


@_config_command
@click.option("--wait-window", is_flag=True,
              help="After promotion, wait for the rollback window to close and clean up.")
@click.option("--force", is_flag=True, help="Run even outside schedule.windows.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve the release's metrics on 127.0.0.1:PORT/metrics (telemetry.listen "
              "chooses another address).")
def release(ctx: click.Context, config_path: Path, wait_window: bool, force: bool,
            metrics_port: int | None) -> None:
    """Run the release, or resume it where it stopped."""
    cfg = _load(ctx, config_path, starting=True)
    stop = Stop.for_run(cfg, force=force)
    if stop.closed:
        # Read only outside every window: a release left with users on green is
        # finished now rather than at the next window.
        stop = stop.left_unfinished(ctx.obj["store"].get(cfg.release.name))
    if stop.closed:
        click.echo(stop.closed)
        ctx.exit(0)
    if metrics_port is not None:
        process_telemetry().serve(f"127.0.0.1:{metrics_port}")
    machine = _release(ctx, cfg, wait_window=wait_window, stop=stop)
    if cfg.pair is not None:
        # Under the release's lock: no other run may start on green while it goes.
        machine.store.acquire_lock()
        try:
            pairing.prepare_green(cfg, machine.store, machine.router)
        except BaseException:
            machine.store.release_lock()
            raise
    with stop.handling_signals():
        outcome = machine.run()
    _echo_outcome(outcome)
    ctx.exit(stop.exit_code(outcome))


@_config_command
@click.option("--reason", default="requested by an operator", show_default=True)
@click.option("--timeout", default=600.0, show_default=True,
              help="Seconds to wait for a running orchestrator to finish the rollback.")
def rollback(ctx: click.Context, config_path: Path, reason: str, timeout: float) -> None:
    """Roll the release back to blue, keeping every acknowledged write."""
    cfg = _load(ctx, config_path)
    ctx.exit(_rollback(ctx, cfg, reason, timeout))


@_config_command
@click.option("--reason", default="aborted by an operator", show_default=True)
def abort(ctx: click.Context, config_path: Path, reason: str) -> None:
    """Abort a running canary (same as rollback)."""
    cfg = _load(ctx, config_path)
    ctx.exit(_rollback(ctx, cfg, reason, 600.0))


def _rollback(ctx: click.Context, cfg: ReleaseConfig, reason: str, timeout: float) -> int:
    """Roll back here, or ask the orchestrator holding the release to and wait: the
    policy of ``orchestrator.rollback_request``."""
    machine = _release(ctx, cfg)
    waited = rollback_request.request_and_wait(
        cfg.release.name, reason, run=lambda why: machine.run(rollback=why),
        open_store=lambda: _store(cfg), timeout=timeout, on_recorded=_echo_recorded)
    if waited.holder_failure:
        click.echo(f"release {cfg.release.name}: the running orchestrator could not "
                   f"finish the rollback: {waited.holder_failure}")
        click.echo("  the rollback resumes where it stopped: run `orchestrate rollback` "
                   "again once the cause is fixed")
        return 1
    if waited.outcome is None:
        click.echo("the running orchestrator has not finished the rollback yet; see "
                   "`orchestrate status`")
        return 1
    _echo_outcome(waited.outcome)
    return 0 if waited.outcome.status == Status.ROLLED_BACK else 1


def _echo_recorded(recorded: rollback_request.Recorded) -> None:
    if recorded.new:
        click.echo(f"rollback requested from the running orchestrator ({recorded.reason}); "
                   "waiting")
    elif recorded.requested:
        click.echo(f"a rollback was already requested ({recorded.requested}); waiting")
    else:
        click.echo("the running orchestrator is already rolling back; waiting")


@_config_command
def promote(ctx: click.Context, config_path: Path) -> None:
    """Approve the next canary stage that waits for a person."""
    cfg = _load(ctx, config_path)
    store = _store(cfg)
    row = store.get(cfg.release.name)
    if row is None or row.status != Status.RUNNING:
        raise OrchestrateError(f"release {cfg.release.name} is not running")
    stage = row.facts.stage
    store.approve_stage(cfg.release.name, stage)
    click.echo(f"stage {stage + 1} of release {cfg.release.name} approved")


@_config_command
@OUTPUT
@click.option("--watch", is_flag=True,
              help="Redraw until the release ends (JSON lines with --output json or when "
              "not on a terminal).")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between reads of the state with --watch.")
def status(ctx: click.Context, config_path: Path, output: str, watch: bool,
           interval: float) -> None:
    """Show where the release is, what it measured, and its recent log."""
    cfg = _load(ctx, config_path)
    store = _store(cfg)
    if watch:
        # --output json: JSON lines even on a terminal (a script that watches).
        ctx.exit(live.watch(cfg, store, interval=interval,
                            tty=False if output == "json" else None))
    row = store.get(cfg.release.name)
    if row is None:
        click.echo(f"release {cfg.release.name} has not started")
        ctx.exit(0)
    assert row is not None
    measurements = store.measurements(row.name)
    entries = store.log_entries(row.name, limit=20)
    window = _window(cfg, row)
    if output == "json":
        # The facts as stored: the same JSON whichever version wrote them.
        release = {**row.__dict__, "facts": row.facts.for_storage()}
        click.echo(json.dumps({"release": release, "measurements": measurements,
                               "log": entries, "rollback_window": window},
                              default=str, indent=2))
        return
    _print_status(cfg, row, window)
    _print_measurements(cfg, measurements)
    click.echo("  recent log:")
    for e in entries:
        click.echo(f"    {e['at']:%H:%M:%S} {e['level']:<8} {e['state'] or '':<10} "
                   f"{e['message']}")


def _print_status(cfg: ReleaseConfig, row: ReleaseRow, window: dict[str, Any] | None) -> None:
    click.echo(f"release {row.name}: state {row.state}, status {row.status}")
    if window is not None:
        click.echo(f"  rollback window: {window['remaining_s']:.0f}s left (closes "
                   f"{window['closes_at']}); `orchestrate rollback` or an alert rolls back")
    if cfg.pair is not None:
        green = pairing.green_side(cfg)
        click.echo(f"  pair: {'b' if green == 'a' else 'a'} is live (a new release's blue), "
                   f"{green} the other")
    if row.error:
        click.echo(f"  error: {row.error}")
    weights, b = row.facts.weights, row.facts.backup
    if weights is not None:
        click.echo(f"  traffic: blue {weights.blue}% / green {weights.green}%")
    if b is not None:
        click.echo(f"  backup: {b.path} ({b.bytes} bytes, sha256 {b.sha256[:16]})")


def _print_measurements(cfg: ReleaseConfig, measurements: list[dict[str, Any]]) -> None:
    if not measurements:
        return
    click.echo("  canary measurements:")
    for m in measurements:
        # Past the last stage: the rollback window's probes, not a "stage 5/4".
        where = (f"stage {m['stage'] + 1}" if m["stage"] < len(cfg.canary.stages)
                 else "window")
        click.echo(f"    {where} ({m['weight']}%) {m['check_name']}: "
                   f"{m['evaluations']} evaluations, {m['failed']} failed, "
                   f"{m['inconclusive']} inconclusive, max {m['max_value']}")


def _window(cfg: ReleaseConfig, row: ReleaseRow) -> dict[str, Any] | None:
    """The open rollback window of a promoted release: when it closes, time left."""
    closes = row.facts.window_closes(cfg.rollback.window)
    if row.state != State.WINDOW or closes is None:
        return None
    remaining = closes - time.time()
    if remaining <= 0:
        return None
    return {"closes_at": datetime.fromtimestamp(closes, UTC).isoformat(timespec="seconds"),
            "remaining_s": round(remaining, 1)}


@_config_command
@OUTPUT
def plan(ctx: click.Context, config_path: Path, output: str) -> None:
    """Print every step and the SQL it would run. Changes nothing."""
    cfg = _load(ctx, config_path)
    steps, notes = planner.build(cfg)
    if output == "json":
        click.echo(json.dumps(planner.as_json(steps, notes), indent=2))
    else:
        click.echo(planner.render_text(cfg, steps, notes))


@_config_command
@OUTPUT
def validate(ctx: click.Context, config_path: Path, output: str) -> None:
    """Compare green with blue now (counts, checksums, schema)."""
    from orchestrator.pg import replication
    from orchestrator.pg import validate as validation
    from orchestrator.pg.endpoint import Endpoint

    cfg = _load(ctx, config_path)
    schema = cfg.state.schema_name
    blue_end, green_end = Endpoint(cfg.blue, "blue"), Endpoint(cfg.green, "green")
    fwd, rev = replication.forward(cfg.release.name), replication.reverse(cfg.release.name)
    # While replication streams, differences are re-checked after the subscriber has
    # provably applied what the publisher committed; which side publishes depends on
    # whether the release was promoted (then green leads and its sequences must be
    # ahead of blue's).
    with blue_end.connect("validate") as blue, green_end.connect("validate") as green:
        forward_live = replication.subscription_exists(green, fwd.subscription)
        reverse_live = replication.subscription_exists(blue, rev.subscription)
    promoted = reverse_live and not forward_live

    def catch_up() -> None:
        with blue_end.connect("validate") as b, green_end.connect("validate") as g:
            if promoted:
                replication.wait_applied(g, b, schema=schema, direction="rev",
                                         subscription=rev.subscription,
                                         timeout=cfg.sync.catchup_timeout)
            else:
                replication.wait_applied(b, g, schema=schema, direction="fwd",
                                         subscription=fwd.subscription,
                                         timeout=cfg.sync.catchup_timeout)

    report = validation.validate(
        blue_end, green_end, cfg.validate_, control_schema=schema,
        exclude_tables=tuple(cfg.sync.exclude_tables),
        catch_up=catch_up if (forward_live or reverse_live) else None,
        expect_sequences_ahead=promoted, publisher="green" if promoted else "blue")
    if output == "json":
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        click.echo(validation.render_text(report))
    ctx.exit(0 if report.ok else 1)


@_config_command
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Address to listen on (default: alerts.listen, 127.0.0.1:8080).")
@click.option("--host", default=None, help="Override the host of --listen.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Override the port of --listen (0: any free port).")
@click.option("--insecure", is_flag=True,
              help="Run without a bearer token; allowed on a loopback address only.")
def serve(ctx: click.Context, config_path: Path, listen: str | None, host: str | None,
          port: int | None, insecure: bool) -> None:
    """Receive Alertmanager webhooks: a matching firing alert rolls the release back."""
    from orchestrator.server import parse_listen
    from orchestrator.server import serve as run_server

    cfg = _load(ctx, config_path)
    default_host, default_port = parse_listen(listen or cfg.alerts.listen)
    # As written: without release.name the receiver follows the release of the day.
    run_server(cfg, host=host or default_host, port=default_port if port is None else port,
               insecure=insecure, loaded=load_config(config_path))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="orchestrate", standalone_mode=False)
    except OrchestrateError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except Interrupted as exc:
        click.echo(f"stopped: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"error: unexpected {type(exc).__name__}: {logs.scrub(str(exc))}", err=True)
        click.echo("hint: run again with --debug for the traceback, and report it", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
