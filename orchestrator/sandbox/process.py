"""Child processes of the sandbox: each in its own process group, logging to a file,
and always stopped (explicitly, or at interpreter exit as a last resort)."""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from orchestrator.errors import OrchestrateError

log = structlog.get_logger()

SETUP_HINT = "run ./scripts/setup.sh to install PostgreSQL, HAProxy and Prometheus"


class Service:
    """Something the sandbox starts and stops; ``with`` starts it and always stops it."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SandboxError(OrchestrateError):
    """The local sandbox could not be set up or started."""

    def __init__(self, message: str, hint: str | None = SETUP_HINT) -> None:
        super().__init__(message, hint)


@dataclass(frozen=True)
class RunAs:
    """An unprivileged OS account a server runs as."""

    name: str
    uid: int
    gid: int
    home: str


def service_user(name: str = "postgres") -> RunAs | None:
    """The account servers must run as, or None to run as ourselves.

    PostgreSQL refuses to run as root, so when we are root the clusters run as the
    'postgres' account the Debian package created.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError as exc:
        raise SandboxError(f"running as root, but there is no '{name}' OS user to run as") from exc
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def give_to(path: Path, user: RunAs | None) -> None:
    """Make ``path`` (a file or directory we created) owned by ``user``."""
    if user is not None:
        os.chown(path, user.uid, user.gid)


def make_traversable(path: Path, user: RunAs | None) -> None:
    """Let ``user`` reach ``path`` through its ancestors.

    Temporary directories (pytest's, mkdtemp's) are mode 0700 and owned by root, so
    a server running as 'postgres' could not reach its data directory. Adding the
    search bit (not read) for others on the directories we own is the smallest
    change that lets it through; directories owned by someone else are left alone.
    """
    if user is None:
        return
    me = os.geteuid()
    for parent in [path, *path.parents]:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == user.uid:
            continue
        if st.st_mode & 0o001:
            continue
        if st.st_gid == user.gid and st.st_mode & 0o010:
            continue
        if st.st_uid == me:
            os.chmod(parent, (st.st_mode & 0o7777) | 0o001)
            log.debug("sandbox.chmod_search", path=str(parent))


def find_binary(name: str, fallback: Path) -> Path:
    """``name`` on PATH, else at ``fallback`` (Debian puts some daemons outside PATH)."""
    found = shutil.which(name) or (str(fallback) if fallback.is_file() else None)
    if not found:
        raise SandboxError(f"{name} is not installed (looked in PATH and {fallback.parent})")
    return Path(found)


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_live: list[ManagedProcess] = []
_live_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    # A last resort for a crash or Ctrl-C between start and the caller's finally:
    # servers outliving the interpreter would hold ports and disk until reboot.
    with _live_lock:
        remaining = list(reversed(_live))
    for proc in remaining:
        with contextlib.suppress(Exception):
            proc.stop()


atexit.register(_stop_all_at_exit)


class ManagedProcess:
    """One long-running child process: a new session (so the whole group can be
    killed), output to ``log_path``, and a stop that escalates to SIGKILL."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: RunAs | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def start(self) -> None:
        if self.running:
            return
        env = dict(os.environ if self.env is None else self.env)
        if self.user is not None:
            env.update(HOME=self.user.home, USER=self.user.name, LOGNAME=self.user.name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logfile:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                user=self.user.uid if self.user else None,
                group=self.user.gid if self.user else None,
                extra_groups=[] if self.user else None,
            )
        with _live_lock:
            _live.append(self)
        log.debug("sandbox.process_started", name=self.name, pid=self._popen.pid)

    def stop(self) -> None:
        """Stop the process and everything in its group. Idempotent."""
        popen = self._popen
        if popen is None:
            return
        pgid = popen.pid  # a session leader's pid is its group id
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(self.stop_signal)
            try:
                popen.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("sandbox.process_kill", name=self.name, pid=popen.pid)
        # Also reaches children the leader left behind (or all of them if it hung).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)
        with _live_lock:
            if self in _live:
                _live.remove(self)
        log.debug("sandbox.process_stopped", name=self.name, returncode=popen.returncode)

    def start_and_wait(
        self,
        ready: Callable[[], bool],
        *,
        what: str,
        timeout: float,
        interval: float = 0.1,
    ) -> float:
        """Start, then poll ``ready``; a service that never gets ready is stopped again
        so that no half-started child outlives the failure. Returns the seconds it took."""
        started = time.monotonic()
        self.start()
        try:
            wait_until(ready, what=what, timeout=timeout, interval=interval, proc=self)
        except BaseException:
            self.stop()
            raise
        return round(time.monotonic() - started, 2)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until(
    predicate: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    interval: float = 0.1,
    proc: ManagedProcess | None = None,
) -> None:
    """Poll ``predicate`` until true; fail early if ``proc`` dies meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc is not None and proc._popen is not None and not proc.running:
            raise SandboxError(
                f"{proc.name} exited with status {proc.returncode} while waiting for {what}; "
                f"last lines of {proc.log_path}:\n{proc.log_tail()}",
                hint=f"read {proc.log_path}",
            )
        if time.monotonic() >= deadline:
            tail = f"; last lines of {proc.log_path}:\n{proc.log_tail()}" if proc else ""
            raise SandboxError(
                f"timed out after {timeout:.0f}s waiting for {what}{tail}",
                hint=f"read {proc.log_path}" if proc else None,
            )
        time.sleep(interval)


def run_checked(
    argv: Sequence[str | os.PathLike[str]],
    *,
    what: str,
    timeout: float,
    user: RunAs | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a short command to completion; its output goes into the error if it fails."""
    run_env = dict(os.environ if env is None else env)
    if user is not None:
        run_env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    try:
        done = subprocess.run(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=run_env,
            cwd=cwd,
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"{what} did not finish within {timeout:.0f}s") from exc
    except OSError as exc:
        raise SandboxError(f"cannot run {os.fspath(argv[0])} for {what}: {exc.strerror}") from exc
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise SandboxError(
            f"{what} failed (exit {done.returncode}): {output[-2000:]}",
            hint=None,
        )
    return output


def http_get(host: str, port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """A plain HTTP GET on the loopback servers of the sandbox: (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
