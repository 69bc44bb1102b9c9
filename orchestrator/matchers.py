"""Label matchers, parsed in one place: ``alerts.matchers`` and ``canary.builtin``
selectors use the same syntax.

A matcher value is "v" (equals), "~re" (the regex fully matches), "!v" or "!~re"
(negated); after the optional "!", a leading "=" means a literal value, so "=~v" and
"!=~v" compare with "~v". :func:`parse` reads that syntax; ``Matcher.promql()`` writes
it as a PromQL label matcher (for the built-in checks, whose regexes Prometheus runs)
and ``Matcher.matches()`` tests a label set (for alerts). Alert values are templates
(``$service``...) filled in first by :func:`parse_matcher`, which also compiles the
regex; the configuration checks each value with it and the receiver compiles them
with the same function, so what the config accepts is exactly what the receiver runs.

No imports from the rest of the package: ``orchestrator.config`` imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from string import Template


@dataclass(frozen=True)
class Matcher:
    label: str
    negate: bool
    regex: bool
    value: str  # the exact value, or the regex without its "~"
    spec: str  # as written (after template substitution), for messages

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """The compiled regex; ValueError names the label when it does not compile."""
        try:
            return re.compile(self.value)
        except re.error as exc:
            raise ValueError(f"matcher {self.label}: {self.value!r} is not a valid regular "
                             f"expression ({exc})") from None

    def matches(self, labels: Mapping[str, str]) -> bool:
        # A missing label reads as "", as in Alertmanager's own matchers.
        given = labels.get(self.label, "")
        hit = self.pattern.fullmatch(given) is not None if self.regex else given == self.value
        return hit != self.negate

    def promql(self) -> str:
        """The PromQL label matcher. ``$`` stays as it is: the query is a template."""
        op = {(False, False): "=", (False, True): "=~", (True, False): "!=", (True, True): "!~"}[
            (self.negate, self.regex)]
        quoted = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.label}{op}"{quoted}"'


def parse(label: str, spec: str) -> Matcher:
    """The syntax alone: no template substitution, the regex not compiled."""
    negate = spec.startswith("!")
    body = spec[1:] if negate else spec
    if body.startswith("~"):
        return Matcher(label, negate, True, body[1:], spec)
    return Matcher(label, negate, False, body.removeprefix("="), spec)


def parse_matcher(label: str, raw: str, variables: Mapping[str, str] | None = None) -> Matcher:
    """One alert matcher, templates filled in; ValueError names the label when its regex
    does not compile."""
    matcher = parse(label, Template(raw).safe_substitute(variables or {}))
    if matcher.regex:
        _ = matcher.pattern
    return matcher


class Matchers:
    """Every matcher must hold. Empty: nothing is matched by labels alone."""

    def __init__(self, spec: Mapping[str, str], variables: Mapping[str, str]) -> None:
        self._tests = [parse_matcher(label, raw, variables) for label, raw in spec.items()]

    def __bool__(self) -> bool:
        return bool(self._tests)

    def match(self, labels: Mapping[str, str]) -> bool:
        return all(t.matches(labels) for t in self._tests)

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
