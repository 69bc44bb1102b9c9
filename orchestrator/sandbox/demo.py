"""The embedded demo: a whole release, blue to green, under live traffic, on this machine.

    python -m orchestrator.sandbox.demo               # expect: promoted
    python -m orchestrator.sandbox.demo --fail-green  # expect: rolled back

It starts the sandbox (two PostgreSQL majors, two demo app instances, HAProxy,
Prometheus), sends a steady mix of reads and writes through HAProxy, runs
``orchestrate release`` in this process, and checks the outcome: the expected end
state, and no acknowledged write missing from the database that serves afterwards.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import structlog

from orchestrator.config import HAProxyRouterConfig
from orchestrator.errors import OrchestrateError
from orchestrator.logging import configure as configure_logging
from orchestrator.routers.base import Weights
from orchestrator.routers.haproxy import HAProxyRouter
from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.sandbox.stack import APP_DATABASE, Sandbox

log = structlog.get_logger()

# Fault injection for --fail-green: well above the error-rate check's 5 % limit,
# so the canary has to roll back at its first stage with traffic.
FAIL_GREEN_RATE = 0.3


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.sandbox.demo",
        description="Run a blue-green release of the demo shop on a local sandbox.",
    )
    parser.add_argument(
        "--fail-green",
        action="store_true",
        help=f"make green answer {FAIL_GREEN_RATE:.0%} of requests with 500: expect a rollback",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the sandbox running after the release, until Ctrl-C",
    )
    parser.add_argument("--blue-major", type=int, default=16, help="blue's PostgreSQL major")
    parser.add_argument("--green-major", type=int, default=17, help="green's PostgreSQL major")
    parser.add_argument("--scale", type=int, default=1, help="seed data scale factor")
    return parser.parse_args(argv)


@contextmanager
def _environment(extra: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_release(config_path: Path) -> int:
    """``orchestrate release`` in this process; its exit code."""
    # Imported by name, late: the CLI pulls in the whole orchestrator, and the
    # sandbox part of the demo must work (and type-check) on its own.
    missing: str | None = None
    try:
        cli = importlib.import_module("orchestrator.cli")
    except ImportError as exc:
        missing = str(exc)
    if missing is not None:
        log.error("demo.cli_missing", error=missing)
        return 127
    try:
        # --wait-window: the demo's rollback window is short, so the release runs to
        # its very end (replication objects removed) and the demo shows all of it.
        result: Any = cli.main(["release", "--config", str(config_path), "--wait-window"])
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return result if isinstance(result, int) else 0


def _missing_acked_orders(cluster: PgCluster, order_ids: list[int]) -> int | None:
    """How many acknowledged orders the serving database lacks (None: cannot tell)."""
    if not order_ids:
        return 0
    try:
        with psycopg.connect(cluster.conninfo(APP_DATABASE), connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(DISTINCT id) FROM public.orders WHERE id = ANY(%s)",
                (order_ids,),
            ).fetchone()
    except psycopg.Error as exc:
        log.warning("demo.orders_check_failed", cluster=cluster.name, error=str(exc))
        return None
    found = int(row[0]) if row else 0
    return len(set(order_ids)) - found


def _describe_errors(errors: object) -> str:
    """The load report's errors: a count, or counts by kind ({"503": 4})."""
    if isinstance(errors, Mapping):
        total = sum(int(n) for n in errors.values())
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(errors.items()))
        return f"{total} errors" + (f" ({kinds})" if kinds else "")
    return f"{errors} errors"


def _live_weights(sandbox: Sandbox) -> Weights | None:
    router = HAProxyRouter(
        HAProxyRouterConfig(kind="haproxy", socket=str(sandbox.haproxy.admin_socket))
    )
    try:
        return router.current()
    except OrchestrateError as exc:
        log.warning("demo.weights_unreadable", error=str(exc))
        return None


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait_for_ctrl_c(sandbox: Sandbox) -> None:
    print(
        f"\nSandbox kept running in {sandbox.base_dir}\n"
        f"  app via HAProxy : {sandbox.haproxy.url}\n"
        f"  Prometheus      : {sandbox.prometheus.url}\n"
        f"  HAProxy admin   : {sandbox.haproxy.admin_socket}\n"
        f"  blue / green PG : 127.0.0.1:{sandbox.blue.port} / 127.0.0.1:{sandbox.green.port}"
        f" (user postgres, passwords in {sandbox.blue.pwfile} and {sandbox.green.pwfile})\n"
        "Press Ctrl-C to stop it.",
        flush=True,
    )
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("\nstopping the sandbox", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    configure_logging()
    # A plain SIGTERM would end Python without running the finally below, leaving
    # PostgreSQL, HAProxy and Prometheus running (they are in their own sessions).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    base_dir = Path(tempfile.mkdtemp(prefix="orchestrate-demo-"))
    sandbox = Sandbox(
        base_dir,
        blue_major=args.blue_major,
        green_major=args.green_major,
        scale=args.scale,
        green_fail_rate=FAIL_GREEN_RATE if args.fail_green else 0.0,
    )
    load: Any = None
    ok = False
    try:
        sandbox.start()
        loadgen = importlib.import_module("orchestrator.sandbox.loadgen")
        load = loadgen.LoadGenerator(sandbox.haproxy.url, rate=40.0, write_ratio=0.3)
        load.start()
        overrides: dict[str, Any] = {"rollback": {"window": "5s"}}
        if args.blue_major < 16:
            # Blue without origin filtering: green takes writes at one switchover, so
            # the canary goes 0 -> 100 (partial stages are refused in preflight).
            overrides["canary"] = {"stages": [{"weight": 0, "duration": "4s"},
                                              {"weight": 100, "duration": "10s"}]}
        config_path = sandbox.write_config(base_dir / "release.yaml", **overrides)
        log.info("demo.release_starting", config=str(config_path), fail_green=args.fail_green)
        started = time.monotonic()
        with _environment(sandbox.secrets_env):
            exit_code = _run_release(config_path)
        elapsed = time.monotonic() - started
        report = load.stop()
        load = None

        weights = _live_weights(sandbox)
        promoted = exit_code == 0 and weights == Weights.green_at(100)
        rolled_back = exit_code != 0 and weights == Weights.green_at(0)
        serving = sandbox.green if promoted else sandbox.blue
        acked = [int(i) for i in report.acked_order_ids]
        missing = _missing_acked_orders(serving, acked)
        expected = rolled_back if args.fail_green else promoted
        ok = expected and missing == 0

        outcome = "promoted" if promoted else "rolled back" if rolled_back else "unfinished"
        print(
            "\n=== orchestrate demo ===\n"
            f"release      : exit code {exit_code} after {elapsed:.0f}s -> {outcome} "
            f"(expected {'rolled back' if args.fail_green else 'promoted'})\n"
            f"traffic      : {weights if weights else 'unknown (HAProxy unreadable)'}\n"
            f"load         : {report.requests} requests, {report.ok} ok, "
            f"{_describe_errors(report.errors)}, "
            f"longest write gap {report.max_write_gap_s:.2f}s\n"
            f"writes       : {len(acked)} orders acknowledged, "
            f"{'?' if missing is None else missing} missing on {serving.name} "
            f"(PostgreSQL {serving.major})\n"
            f"result       : {'OK' if ok else 'UNEXPECTED'}"
            + ("" if ok or args.keep else f" (logs kept in {base_dir})"),
            flush=True,
        )
        if args.keep:
            _wait_for_ctrl_c(sandbox)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
    except OrchestrateError as exc:
        print(f"\ndemo failed: {exc}\n(logs in {base_dir})", flush=True)
    finally:
        if load is not None:
            try:
                load.stop()
            except Exception as exc:
                log.warning("demo.load_stop_failed", error=str(exc))
        sandbox.stop()
        if ok and not args.keep:
            shutil.rmtree(base_dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
