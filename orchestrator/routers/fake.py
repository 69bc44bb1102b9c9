"""An in-memory router with the same contract as the real ones (used by plans and tests)."""

from __future__ import annotations

from orchestrator.routers.base import RouterError, WeightDriftError, Weights


class FakeRouter:
    def __init__(self, initial: Weights | None = None) -> None:
        self.weights = initial or Weights.green_at(0)
        self.history: list[Weights] = []
        self.fail_next: int = 0

    def describe(self) -> str:
        return "fake router (in memory)"

    def check(self) -> None:
        return None

    def current(self) -> Weights:
        return self.weights

    def set_weights(self, target: Weights, *, expected: Weights | None = None) -> Weights:
        if expected is not None and self.weights != expected:
            raise WeightDriftError(expected, self.weights, self.describe())
        if self.fail_next:
            self.fail_next -= 1
            raise RouterError("fake router told to fail")
        self.weights = target
        self.history.append(target)
        return self.weights
