"""Errors a user can hit. Each carries what went wrong and what to do about it.

The CLI prints ``message`` and ``hint`` without a traceback (unless --debug), and
exits with ``exit_code``.
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
