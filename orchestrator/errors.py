"""Errors a user can hit. Each carries what went wrong and what to do about it.

The CLI prints ``message`` and ``hint`` without a traceback (unless --debug), and
exits with ``exit_code``.

Exit codes of ``orchestrate release``: 0 promoted (or outside every maintenance
window: nothing done), 1 rolled back or failed, 2 bad config or preflight, 3 another
orchestrator holds the release, 4 stopped by its deadline, the end of its window
or a signal, with all traffic on blue (rolled back, or stopped before the canary
and resumable).
"""

from __future__ import annotations


class OrchestrateError(Exception):
    """Base class of every error meant for a person to read."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ConfigError(OrchestrateError):
    """The configuration file is missing, unreadable or invalid. Nothing was changed."""

    exit_code = 2


class PreflightError(OrchestrateError):
    """A precondition of the release does not hold. Nothing was changed."""

    exit_code = 2


class LockedError(OrchestrateError):
    """Another orchestrator holds this release."""

    exit_code = 3


class ReleaseFailed(OrchestrateError):
    """A state failed; the release was (or must be) rolled back."""


class RolledBack(OrchestrateError):
    """The release ended rolled back (automatically or on request)."""


class ExternalError(OrchestrateError):
    """An external system (PostgreSQL, Prometheus, Kubernetes, a router) failed."""


class ConnectError(ExternalError):
    """A server could not be reached or refused us, before this command changed anything.

    Exit code 2 like a bad config: blue, green and the state database are treated
    alike (inside a running release the state machine catches it and rolls back)."""

    exit_code = 2


class AuthenticationError(ConnectError):
    """The server answered and refused the credentials: permanent, never retried."""


class StateUnavailable(ExternalError):
    """The control schema's database stopped answering mid-release. Nothing more can
    be recorded; the release stops in its last recorded state and resumes on rerun."""


# ``orchestrate release`` stopped for time (deadline, window end) or a signal, with
# every user on blue: distinct from 1, so that a CronJob's history tells "ran out of
# time" from "green was bad".
STOPPED_EXIT = 4


class Interrupted(BaseException):
    """The run stopped before the canary moved any traffic (a signal, the deadline):
    nothing to undo, and the next run resumes. A ``BaseException`` so that no state
    takes it for its own failure and starts a rollback."""

    exit_code = STOPPED_EXIT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
