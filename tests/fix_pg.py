"""``@pytest.mark.pg(">=16")``: the PostgreSQL majors a test needs (psycopg's
``tests/fix_db.py`` ``pg`` marker is the model).

Unlike psycopg, which skips a test the server cannot run, a mismatch FAILS here:
``scripts/setup.sh`` installs every major, so a test declared for 16+ that runs on 15
is a test bug (a fixture swapped, a pair parametrised wrong), not a missing server.

The majors a test runs on are those of the clusters among its fixtures (a
``PgCluster``, a ``Sandbox``'s blue and green, a dict, list or object holding them)
and of every ``PgCluster`` made while the test runs. A marked test with no cluster at
all fails too: its marker says it needs one.

A spec is clauses joined by ",", all of which must hold: ``16`` (that major),
``>=16``, ``>16``, ``<=17``, ``<18``, ``==16``, ``!=15``, or ``16-17`` (both ends
included).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from orchestrator.sandbox.pgcluster import PgCluster

_OPS: dict[str, Callable[[int, int], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
    "==": operator.eq, "!=": operator.ne}
_CLAUSE = re.compile(r"(?:(?P<op>>=|<=|==|!=|>|<)?(?P<major>\d+)|(?P<low>\d+)-(?P<high>\d+))")


@dataclass(frozen=True)
class MajorSpec:
    text: str
    clauses: tuple[tuple[str, int], ...]

    def matches(self, major: int) -> bool:
        return all(_OPS[op](major, bound) for op, bound in self.clauses)


def parse_spec(text: str) -> MajorSpec:
    """The spec ``text`` (see the module docstring); ValueError when it is not one."""
    clauses: list[tuple[str, int]] = []
    for part in text.split(","):
        m = _CLAUSE.fullmatch(re.sub(r"\s+", "", part))
        if m is None:
            raise ValueError(f"pg marker: {part.strip()!r} of {text!r} is not a version "
                             "spec (e.g. '>=16', '16', '<18', '16-17')")
        if m["low"] is not None:
            low, high = int(m["low"]), int(m["high"])
            if low > high:
                raise ValueError(f"pg marker: the range {part.strip()!r} is empty")
            clauses += [(">=", low), ("<=", high)]
        else:
            clauses.append((m["op"] or "==", int(m["major"])))
    return MajorSpec(text, tuple(clauses))


def clusters_in(value: object, depth: int = 0) -> Iterator[PgCluster]:
    """The clusters ``value`` is or holds, two levels down at most."""
    if isinstance(value, PgCluster):
        yield value
        return
    if depth >= 2 or isinstance(value, (str, bytes, type)):
        return
    children: Iterable[object]
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = value
    elif hasattr(value, "__dict__") and not type(value).__module__.startswith(
            ("_pytest", "pytest", "pluggy")):
        children = vars(value).values()
    else:
        return
    for child in children:
        yield from clusters_in(child, depth + 1)


def mismatch(specs: list[MajorSpec], majors: set[int]) -> str | None:
    """Why a test declared for ``specs`` must not run on ``majors``; None if it may."""
    if not majors:
        return (f"declares @pytest.mark.pg({', '.join(repr(s.text) for s in specs)}) but "
                "runs on no PostgreSQL cluster this plugin can see")
    for spec in specs:
        wrong = sorted(m for m in majors if not spec.matches(m))
        if wrong:
            return (f"declares @pytest.mark.pg({spec.text!r}) but runs on PostgreSQL "
                    f"{', '.join(map(str, wrong))} (its majors: "
                    f"{', '.join(map(str, sorted(majors)))}); every major is installed, so "
                    "this is a test bug: give it a fixture of the majors it needs")
    return None


def _specs(item: pytest.Item) -> list[MajorSpec]:
    specs = []
    for mark in item.iter_markers("pg"):
        if len(mark.args) != 1 or not isinstance(mark.args[0], str) or mark.kwargs:
            pytest.fail(f"{item.nodeid}: use @pytest.mark.pg('<spec>'), e.g. '>=16'",
                        pytrace=False)
        try:
            specs.append(parse_spec(mark.args[0]))
        except ValueError as exc:
            pytest.fail(f"{item.nodeid}: {exc}", pytrace=False)
    return specs


def _fail_on_mismatch(item: pytest.Item, specs: list[MajorSpec], majors: set[int]) -> None:
    why = mismatch(specs, majors)
    if why is not None:
        pytest.fail(f"{item.nodeid} {why}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    specs = _specs(item)
    if not specs:
        return (yield)
    funcargs: dict[str, object] = getattr(item, "funcargs", {})
    majors = {c.major for v in funcargs.values() for c in clusters_in(v)}
    made: list[int] = []
    original = PgCluster.__init__

    def recording(self: PgCluster, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self.major)

    if majors:
        # Fail before a long test runs on the wrong servers.
        _fail_on_mismatch(item, specs, majors)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PgCluster, "__init__", recording)
        result = yield
    _fail_on_mismatch(item, specs, majors | set(made))
    return result
