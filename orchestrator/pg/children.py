"""Child processes (pg_dump, pg_restore, psql) that die with orchestrate.

``kill -9`` gives orchestrate no chance to stop what it started: left alone, the
psql pipes of an initial copy would go on filling green while the next run truncates
and copies the same tables again, and a pg_dump would keep writing a backup nobody
waits for. On Linux every child therefore asks the kernel, between fork and exec,
for SIGKILL the moment its parent goes (``prctl(PR_SET_PDEATHSIG)``, kept across
exec). Once a psql is gone its server session ends too: the backend's next read or
write on the closed socket fails.

The kernel's "parent" there is the *thread* that forked, not the process: a child
forked by a ThreadPoolExecutor worker (the initial copy runs its pipes on such
workers) would be killed as soon as that worker thread exits. Every child is
therefore forked by one thread that lives as long as the process does (``_Forker``);
callers in any thread get their ``Popen`` back from it and wait on it as usual.

Children also start with umask 077: nothing orchestrate's children write (a dump
above all) is meant for other local users, and a mode set at creation leaves no
window in which the file is readable.

Elsewhere than Linux there is no such kernel feature; children are then started
plainly and the copy's resume logic ends sessions a dead run left on the servers.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

PR_SET_PDEATHSIG = 1
CHILD_UMASK = 0o077

_prctl: Any = None
if sys.platform.startswith("linux"):
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
    _prctl.restype = ctypes.c_int


def _die_with(parent: int) -> Callable[[], None]:
    """The child's setup between fork and exec: SIGKILL when ``parent`` goes."""

    def setup() -> None:
        if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork and prctl: then nobody would ever
        # send the signal, and the child must not go on alone.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


class _Forker:
    """One long-lived thread that forks every child (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._thread: threading.Thread | None = None
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue())

    def _loop(self) -> None:
        while True:
            fn, fut = self._requests.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller, which re-raises it
                fut.set_exception(exc)

    def call(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            # After os.fork() (a test's helper process, say) the thread is not there.
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._requests = queue.SimpleQueue()
                self._pid = os.getpid()
                # A daemon: it must not keep the interpreter from exiting, and it exits
                # only with the process, which is exactly when its children must go.
                self._thread = threading.Thread(target=self._loop, name="orchestrate-forker",
                                                daemon=True)
                self._thread.start()
            fut: Future[Any] = Future()
            self._requests.put((fn, fut))
        return fut.result()


_forker = _Forker()


def popen(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(cmd, **kwargs)`` for a child that dies with orchestrate.

    Every pg_dump / pg_restore / psql orchestrate runs goes through here. Bytes
    only (no ``text=``): callers decode what they read themselves.
    """
    if _prctl is None:
        return subprocess.Popen(list(cmd), umask=CHILD_UMASK, **kwargs)
    setup = _die_with(os.getpid())

    def spawn() -> subprocess.Popen[bytes]:
        # preexec_fn can deadlock a threaded parent when it takes a lock another thread
        # held at fork; this one only makes two system calls (the prctl function was
        # looked up at import) and takes no lock. Python has no other way to set it.
        return subprocess.Popen(list(cmd), umask=CHILD_UMASK,
                                preexec_fn=setup, **kwargs)  # noqa: PLW1509

    proc: subprocess.Popen[bytes] = _forker.call(spawn)
    return proc


def run(cmd: Sequence[str], *, timeout: float, env: dict[str, str] | None = None,
        stdout: int | None = subprocess.PIPE) -> tuple[int, bytes, bytes]:
    """Run to completion: (returncode, stdout, stderr). On timeout the child is killed
    and reaped before ``subprocess.TimeoutExpired`` propagates."""
    with popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
               env=env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            # A timeout, or Ctrl-C: nothing is left running behind the caller's back.
            proc.kill()
            proc.communicate()
            raise
    return proc.returncode, out or b"", err or b""
