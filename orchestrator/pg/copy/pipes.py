"""The transport: a psql pipe per copy task, blue's COPY TO into green's \\copy FROM.

The rows never pass through this process; a watchdog reads the children's I/O
counters to notice a pipe that stopped moving (see the package docstring).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from psycopg import sql

from orchestrator.errors import ExternalError, ReleaseFailed
from orchestrator.logging import scrub
from orchestrator.pg import children
from orchestrator.pg.copy.plan import CopyTask
from orchestrator.pg.copy.state import app_name, ident
from orchestrator.pg.endpoint import Endpoint, EndpointLike
from orchestrator.pg.tools import PgTools

_PSQL_ENV_DROP = ("PGOPTIONS", "PGSERVICE", "PGSERVICEFILE", "PGDATABASE")


def _env(db: Endpoint, app: str, options: list[str], encoding: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PSQL_ENV_DROP}
    env.update(db.tool_settings())
    env.update({"PGAPPNAME": app, "PGOPTIONS": " ".join(f"-c {o}" for o in options),
                "PGCLIENTENCODING": encoding})
    return env


# Session settings that make a text COPY read back exactly what it wrote, whatever
# the servers' defaults are.
_PORTABLE = ["datestyle=ISO", "intervalstyle=postgres", "extra_float_digits=3",
             "statement_timeout=0", "idle_in_transaction_session_timeout=0",
             # A DDL statement queued on blue must not stall a copy forever.
             "lock_timeout=300000"]


@dataclass(eq=False)
class _Pipe:
    blue: subprocess.Popen[bytes]
    green: subprocess.Popen[bytes]
    control: int  # write end of green's command stream

    def kill(self) -> None:
        for proc in (self.blue, self.green):
            if proc.poll() is None:
                proc.kill()
        for proc in (self.blue, self.green):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.close(self.control)


class Copier:
    def __init__(self, blue: EndpointLike, green: EndpointLike,
                 tools: PgTools, *, snapshot: str, slot: str, encoding: str,
                 replica_role: bool, deadline: float, stall_timeout: float = 120.0) -> None:
        blue, green = Endpoint.of(blue, "blue"), Endpoint.of(green, "green")
        app = app_name(slot)
        self.psql = tools.path("psql")
        self.blue_conninfo = blue.tool_conninfo()
        self.green_conninfo = green.tool_conninfo()
        self.blue_env = _env(blue, app, _PORTABLE, encoding)
        green_opts = [*_PORTABLE, "synchronous_commit=off"]
        if replica_role:
            green_opts.append("session_replication_role=replica")
        self.green_env = _env(green, app, green_opts, encoding)
        self.snapshot = snapshot
        self.deadline = deadline
        self.stall_timeout = stall_timeout
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._pipes: set[_Pipe] = set()

    def blue_cmd(self, task: CopyTask) -> list[str]:
        cols = sql.SQL(", ").join(map(sql.Identifier, task.columns))
        src = ident(*task.source)
        fmt = sql.SQL("binary" if task.binary else "text")
        if task.pages is None and task.only:
            copy = sql.SQL("COPY {} ({}) TO STDOUT (FORMAT {})").format(src, cols, fmt)
        else:
            where: sql.Composable = sql.SQL("")
            if task.pages is not None:
                lo, hi = task.pages
                where = sql.SQL(" WHERE ctid >= {}::tid").format(sql.Literal(f"({lo},0)"))
                if hi is not None:
                    where = sql.SQL("{} AND ctid < {}::tid").format(
                        where, sql.Literal(f"({hi},0)"))
            copy = sql.SQL("COPY (SELECT {} FROM {}{}{}) TO STDOUT (FORMAT {})").format(
                cols, sql.SQL("ONLY ") if task.only else sql.SQL(""), src, where, fmt)
        snap = sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot))
        return [self.psql, "-X", "-q", "-w", "-v", "ON_ERROR_STOP=1",
                "-d", self.blue_conninfo,
                "-c", "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                "-c", snap.as_string(None), "-c", copy.as_string(None), "-c", "COMMIT"]

    def green_script(self, task: CopyTask) -> str:
        cols = sql.SQL(", ").join(map(sql.Identifier, task.columns)).as_string(None)
        target = ident(*task.target).as_string(None)
        opts = ["format binary" if task.binary else "format text"]
        lines = ["BEGIN;"]
        if task.freeze:
            lines.append(f"TRUNCATE ONLY {target};")
            opts.append("freeze")
        # \copy reads the rows from psql's own stdin (the pipe from blue) while the
        # commands come from the control stream; a plain COPY .. FROM STDIN would
        # read the rows from the command stream.
        lines.append(f"\\copy {target} ({cols}) from pstdin with ({', '.join(opts)})")
        return "\n".join(lines) + "\n"

    def run(self, task: CopyTask) -> int:
        """Copy one task; returns the rows green received."""
        if self.cancelled.is_set():
            raise ReleaseFailed("copy cancelled")
        with contextlib.ExitStack() as files:
            errors_b, errors_g, out_g = (files.enter_context(tempfile.TemporaryFile())
                                         for _ in range(3))
            return self._run(task, errors_b, errors_g, out_g)

    def _run(self, task: CopyTask, errors_b: IO[bytes], errors_g: IO[bytes], out_g: IO[bytes]
             ) -> int:
        read_fd, write_fd = os.pipe()
        try:
            green = children.popen(
                [self.psql, "-X", "-w", "-v", "ON_ERROR_STOP=1", "-d", self.green_conninfo,
                 "-f", f"/dev/fd/{read_fd}"],
                stdin=subprocess.PIPE, stdout=out_g, stderr=errors_g, env=self.green_env,
                pass_fds=(read_fd,))
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        try:
            blue = children.popen(self.blue_cmd(task), stdin=subprocess.DEVNULL,
                                  stdout=green.stdin, stderr=errors_b, env=self.blue_env)
        except BaseException:
            green.kill()
            green.wait()
            os.close(write_fd)
            raise
        assert green.stdin is not None
        green.stdin.close()  # blue holds the write end now
        pipe = _Pipe(blue, green, write_fd)
        with self._lock:
            self._pipes.add(pipe)
        try:
            with contextlib.suppress(BrokenPipeError):
                os.write(write_fd, self.green_script(task).encode())
            blue_rc = self._wait(blue, watch=blue, task=task)
            if blue_rc == 0:
                # Only now may green commit: see the package docstring.
                with contextlib.suppress(BrokenPipeError):
                    os.write(write_fd, b"COMMIT;\n")
            os.close(write_fd)
            pipe.control = -1
            green_rc = self._wait(green, watch=green, task=task)
            if blue_rc != 0 or green_rc != 0:
                if self.cancelled.is_set():
                    raise ReleaseFailed("copy cancelled")
                # A failing green makes blue fail too (broken pipe): green's error is
                # the cause then.
                side = "green" if green_rc != 0 else "blue"
                err = _tail(errors_g) if green_rc != 0 else _tail(errors_b)
                raise ExternalError(f"copying {task.label} failed on {side}: {err}")
            match = re.search(rb"^COPY (\d+)$", _read(out_g), re.M)
            return int(match.group(1)) if match else 0
        finally:
            if pipe.control != -1:
                with contextlib.suppress(OSError):
                    os.close(pipe.control)
                pipe.control = -1
            pipe.kill()
            with self._lock:
                self._pipes.discard(pipe)

    def _wait(self, proc: subprocess.Popen[bytes], *, watch: subprocess.Popen[bytes],
              task: CopyTask) -> int:
        """Wait for ``proc``, watching that ``watch`` moves bytes: the data goes from
        one psql to the other without passing through this process, so progress is
        read from the kernel's I/O counters of the child."""
        moved, moved_at = _io_bytes(watch.pid), time.monotonic()
        while True:
            now = time.monotonic()
            remaining = self.deadline - now
            if remaining <= 0:
                raise ReleaseFailed("the initial copy did not finish in time",
                                    hint="raise sync.initial_copy_timeout")
            try:
                return proc.wait(timeout=min(remaining, 0.5))
            except subprocess.TimeoutExpired:
                if self.cancelled.is_set():
                    proc.kill()
            now_moved = _io_bytes(watch.pid)
            if now_moved != moved:
                moved, moved_at = now_moved, time.monotonic()
            elif moved is not None and time.monotonic() - moved_at > self.stall_timeout:
                raise ReleaseFailed(
                    f"copying {task.label}: no byte moved for {self.stall_timeout:g}s (blue "
                    "or green stopped answering)",
                    hint="check both servers; the rerun resumes the copy (raise "
                    "sync.initial_copy.stall_timeout if the servers are only slow)")

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            for proc in (pipe.blue, pipe.green):
                if proc.poll() is None:
                    proc.kill()


def _io_bytes(pid: int) -> int | None:
    """Bytes the process read and wrote so far (Linux /proc), None where unknown."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return int(fields.get("rchar", 0)) + int(fields.get("wchar", 0))


def _read(f: IO[bytes]) -> bytes:
    f.seek(0)
    return f.read()


def _tail(f: IO[bytes]) -> str:
    return scrub(_read(f).decode(errors="replace").strip())[-800:] or "no message"

