"""The traffic router interface: move a percentage of requests from blue to green.

A router changes the weights and nothing else, reads them back after every change,
and reports a drift (someone changed the weights by hand) instead of overwriting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from orchestrator.errors import ExternalError


@dataclass(frozen=True)
class Weights:
    """Share of traffic in percent; blue + green == 100."""

    blue: int
    green: int

    @classmethod
    def green_at(cls, percent: int) -> Weights:
        if not 0 <= percent <= 100:
            raise ValueError(f"green weight must be 0..100, got {percent}")
        return cls(blue=100 - percent, green=percent)

    def __str__(self) -> str:
        return f"blue {self.blue}% / green {self.green}%"


class RouterError(ExternalError):
    """The router could not be read or changed."""


class WeightDriftError(RouterError):
    """The live weights are not the ones orchestrate last set: a person or another tool
    changed them. orchestrate stops rather than overwrite someone's decision."""

    def __init__(self, expected: Weights, actual: Weights, where: str) -> None:
        super().__init__(
            f"traffic weights on {where} are {actual}, but orchestrate last set {expected}",
            hint="someone changed the route by hand; decide, then run `orchestrate rollback` "
            "or `orchestrate release --adopt-weights` to continue from the live weights",
        )
        self.expected = expected
        self.actual = actual


@runtime_checkable
class TrafficRouter(Protocol):
    def describe(self) -> str:
        """A short, secret-free description for logs: 'haproxy app (/run/haproxy.sock)'."""
        ...

    def check(self) -> None:
        """Preflight: reachable, the object exists, we may change it. Raises RouterError."""
        ...

    def current(self) -> Weights:
        """The live weights, read from the router."""
        ...

    def set_weights(self, target: Weights, *, expected: Weights | None = None) -> Weights:
        """Move to ``target`` and return the weights read back afterwards.

        ``expected`` is what orchestrate last set; when the live weights differ from it,
        raise WeightDriftError and change nothing. Idempotent: setting the current
        weights again is a no-op that still verifies them.
        """
        ...
