"""The ``pg`` version marker (tests/fix_pg.py): its spec parser, the clusters it finds
among a test's fixtures, and a marked test failing, not skipping, on the wrong major."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.sandbox.pgcluster import PgCluster
from tests.fix_pg import clusters_in, mismatch, parse_spec


@pytest.mark.parametrize(("spec", "yes", "no"), [
    (">=16", [16, 17, 18], [15]),
    ("16", [16], [15, 17]),
    ("<18", [15, 16, 17], [18]),
    ("16-17", [16, 17], [15, 18]),
    (" >= 16 , < 18 ", [16, 17], [15, 18]),
    ("!=15", [16], [15]),
    ("==17", [17], [16]),
    (">15", [16], [15]),
    ("<=16", [15, 16], [17]),
])
def test_spec_matches_the_majors_it_names(spec: str, yes: list[int], no: list[int]) -> None:
    parsed = parse_spec(spec)
    assert [m for m in yes if parsed.matches(m)] == yes
    assert [m for m in no if parsed.matches(m)] == []


@pytest.mark.parametrize("spec", ["", ">=", "sixteen", "16.2", "=>16", "17-16", "16-", "~16"])
def test_a_bad_spec_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="pg marker"):
        parse_spec(spec)


def test_clusters_are_found_in_what_fixtures_hold(tmp_path: Path) -> None:
    b15, g17 = PgCluster("b", 15, tmp_path), PgCluster("g", 17, tmp_path)

    class Pair:
        def __init__(self) -> None:
            self.blue_cluster, self.green_cluster = b15, g17

    assert [c.major for c in clusters_in(Pair())] == [15, 17]
    assert [c.major for c in clusters_in({"b15": b15, "g17": g17})] == [15, 17]
    assert [c.major for c in clusters_in([g17])] == [17]
    assert list(clusters_in("b15")) == []


def test_mismatch_names_the_wrong_major() -> None:
    assert mismatch([parse_spec(">=16")], {16, 17}) is None
    why = mismatch([parse_spec(">=16")], {15, 17})
    assert why is not None and "runs on PostgreSQL 15 (its majors: 15, 17)" in why
    assert "no PostgreSQL cluster" in (mismatch([parse_spec("16")], set()) or "")


_MARKED = '''
import pytest
from orchestrator.sandbox.pgcluster import PgCluster

class Sandbox:
    def __init__(self, base, blue, green):
        self.blue = PgCluster("blue", blue, base)
        self.green = PgCluster("green", green, base)

@pytest.fixture
def sandbox(tmp_path):
    return Sandbox(tmp_path, {blue}, 17)

@pytest.mark.pg(">=16")
def test_declared(sandbox):
    pass

@pytest.mark.pg(">=16")
def test_makes_its_own(tmp_path):
    PgCluster("own", {own}, tmp_path)

@pytest.mark.pg("sixteen")
def test_bad_spec():
    pass
'''


def test_a_marked_test_fails_on_a_major_it_did_not_declare(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["tests.fix_pg"]')
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(_MARKED.format(blue=15, own=15))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([
        "*test_declared declares @pytest.mark.pg('>=16') but runs on PostgreSQL 15 (its "
        "majors: 15, 17)*",
        "*test_makes_its_own declares @pytest.mark.pg('>=16') but runs on PostgreSQL 15*",
        "*test_bad_spec: pg marker: 'sixteen'*"])


def test_a_marked_test_on_the_majors_it_declared_passes(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["tests.fix_pg"]')
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(_MARKED.format(blue=16, own=18))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-k", "not bad_spec")
    result.assert_outcomes(passed=2, deselected=1)
