"""Alert label matchers (``alerts.matchers``), parsed in one place.

A matcher value is "v" (equals), "~re" (the regex fully matches), "!v" or "!~re"
(negated), after ``$service``-style template substitution. The configuration checks
each value with :func:`parse_matcher` and the receiver compiles them with the same
function, so what the config accepts is exactly what the receiver runs.

No imports from the rest of the package: ``orchestrator.config`` imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from string import Template


@dataclass(frozen=True)
class Matcher:
    label: str
    negate: bool
    pattern: re.Pattern[str] | None  # None: an exact value
    value: str
    spec: str  # as rendered, for messages

    def holds(self, labels: Mapping[str, str]) -> bool:
        # A missing label reads as "", as in Alertmanager's own matchers.
        given = labels.get(self.label, "")
        hit = self.pattern.fullmatch(given) is not None if self.pattern else given == self.value
        return hit != self.negate


def parse_matcher(label: str, raw: str, variables: Mapping[str, str] | None = None) -> Matcher:
    """One matcher; ValueError names the label when its regex does not compile."""
    value = Template(raw).safe_substitute(variables or {})
    negate = value.startswith("!")
    body = value[1:] if negate else value
    pattern = None
    if body.startswith("~"):
        try:
            pattern = re.compile(body[1:])
        except re.error as exc:
            raise ValueError(f"matcher {label}: {body[1:]!r} is not a valid regular "
                             f"expression ({exc})") from None
    return Matcher(label, negate, pattern, body.removeprefix("="), value)


class Matchers:
    """Every matcher must hold. Empty: nothing is matched by labels alone."""

    def __init__(self, spec: Mapping[str, str], variables: Mapping[str, str]) -> None:
        self._tests = [parse_matcher(label, raw, variables) for label, raw in spec.items()]

    def __bool__(self) -> bool:
        return bool(self._tests)

    def match(self, labels: Mapping[str, str]) -> bool:
        return all(t.holds(labels) for t in self._tests)

    def describe(self) -> str:
        return ", ".join(f"{t.label}: {t.spec!r}" for t in self._tests) or "none"


class AlertSelector:
    """Which firing alerts concern this release.

    Narrow on purpose: an alert rolls the release back only if it names this release
    (``release_label`` equals the release name) or the operator configured matchers
    and they all hold. An alert naming another release never matches, whatever the
    matchers say: a service-wide alert must not roll back a release it is not about.
    """

    def __init__(self, release: str, release_label: str, matchers: Matchers) -> None:
        self.release = release
        self.release_label = release_label
        self.matchers = matchers

    def why_not(self, labels: Mapping[str, str]) -> str | None:
        """None when the alert concerns this release, else the reason it does not."""
        named = labels.get(self.release_label)
        if named is not None and named != self.release:
            return f"it names release {named!r}, not {self.release!r}"
        if self.matchers:
            if self.matchers.match(labels):
                return None
            return f"it does not satisfy alerts.matchers ({self.matchers.describe()})"
        if named == self.release:
            return None
        return (f"it has no {self.release_label}={self.release!r} label and no "
                f"alerts.matchers are configured")

    def describe(self) -> str:
        if self.matchers:
            return f"{self.matchers.describe()} (and not another {self.release_label})"
        return f"{self.release_label}={self.release!r}"
