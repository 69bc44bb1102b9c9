"""Pure logic of the validation: ranges, bounds, SQL shapes, row diffs, column pairing,
the text report. The comparisons against real servers are in
tests/integration/test_validate.py."""

from __future__ import annotations

import json

from orchestrator.config import ValidateConfig
from orchestrator.pg import diff
from orchestrator.pg.diff import FetchedRow, KeyRange, RowDiff, TablePlan, TableResult
from orchestrator.pg.names import QualifiedName as Q
from orchestrator.pg.schema_check import ColumnInfo, ColumnPair, pair_columns
from orchestrator.pg.validate import ValidationReport, checksum_sql, describe_diff, render_text


def _pair(name: str, base: str = "int8", nullable: bool = False, green: str | None = None
          ) -> ColumnPair:
    return ColumnPair(name, green or name, base, base, base, nullable)


def _plan(composite: bool = False) -> TablePlan:
    cols = [_pair("a"), _pair("b", "text"), _pair("v", "text", nullable=True)]
    return TablePlan(Q("public", "t"), cols, cols[:2] if composite else cols[:1])


def test_constants_are_fixed_distinct_signed_64_bit() -> None:
    values = {diff.constant(v, i, k) for v in range(2) for i in range(50) for k in range(1, 5)}
    assert len(values) == 2 * 50 * 4
    assert all(-(1 << 63) <= x < (1 << 63) for x in values)
    assert diff.constant(0, 1, 1) == diff.constant(0, 1, 1)


def test_pick_bounds_takes_even_quantiles_without_duplicates() -> None:
    keys = [(str(i),) for i in range(100)]
    assert diff.pick_bounds(keys, 4) == [("25",), ("50",), ("75",)]
    assert diff.pick_bounds(keys, 1) == []
    assert diff.pick_bounds([], 10) == []
    few = [("1",), ("1",), ("1",), ("2",)]
    assert diff.pick_bounds(few, 4) == [("2",)]


def test_ranges_between_cover_the_key_space_without_gaps() -> None:
    r = diff.ranges_between(None, None, [("10",), ("20",)])
    assert r == [KeyRange(None, ("10",)), KeyRange(("10",), ("20",)), KeyRange(("20",), None)]
    inner = diff.ranges_between(("5",), ("30",), [("10",)])
    assert inner == [KeyRange(("5",), ("10",)), KeyRange(("10",), ("30",))]


def test_range_predicate_uses_row_values_for_composite_keys() -> None:
    where, params = diff.range_predicate(_plan(composite=True), "blue",
                                         KeyRange(("1", "x"), ("2", "y")))
    text = where.as_string(None)
    assert text == '("a", "b") >= (%s, %s) AND ("a", "b") < (%s, %s)'
    assert params == ["1", "x", "2", "y"]
    where, params = diff.range_predicate(_plan(), "blue", KeyRange(None, ("9",)))
    assert where.as_string(None) == '"a" < %s' and params == ["9"]
    where, params = diff.range_predicate(_plan(), "blue", KeyRange())
    assert where.as_string(None) == "TRUE" and params == []


def test_green_side_uses_mapped_column_names() -> None:
    cols = [_pair("id"), _pair("amount", green="amount_cents")]
    plan = TablePlan(Q("public", "o"), cols, cols[:1])
    assert '"amount_cents"' in diff.row_hash(plan, "green").as_string(None)
    assert '"amount_cents"' not in diff.row_hash(plan, "blue").as_string(None)


def test_row_hash_picks_type_hash_or_text_form() -> None:
    cols = [_pair("id"), ColumnPair("n", "n", "numeric", "numeric", "numeric", True),
            ColumnPair("t", "t", "text", "text", "text", True),
            ColumnPair("m", "m", "integer", "bigint", "", False)]
    text = diff.row_hash(TablePlan(Q("public", "x"), cols, cols[:1]), "blue").as_string(None)
    assert 'hashint8extended"("id"' in text
    # numeric reads differently for equal values (1.0 / 1.00): hashed as text
    assert 'CAST("n" AS pg_catalog.text)' in text
    assert 'COALESCE("t", \'\') COLLATE "C"' in text
    # a type changed by the migration is compared through its text form
    assert 'CAST("m" AS pg_catalog.text)' in text
    assert 'CASE WHEN "n" IS NULL' in text and 'CASE WHEN "id" IS NULL' not in text


def test_wide_tables_are_hashed_in_groups() -> None:
    cols = [_pair(f"c{i}") for i in range(70)]
    text = diff.row_hash(TablePlan(Q("public", "w"), cols, cols[:1]), "blue").as_string(None)
    assert text.count(" # ") == 2  # three groups of at most 32, XORed and mixed


def test_bucket_query_assigns_parts_with_a_tree_of_row_comparisons() -> None:
    query, params = diff.bucket_query(_plan(composite=True), "blue", KeyRange(("0", "a"), None),
                                      [("1", "b"), ("2", "c"), ("3", "d")], strong=True)
    text = query.as_string(None)
    assert text.startswith(
        'SELECT CASE WHEN ("a", "b") < (%s, %s) THEN CASE WHEN ("a", "b") < (%s, %s) THEN 0 '
        'ELSE 1 END ELSE CASE WHEN ("a", "b") < (%s, %s) THEN 2 ELSE 3 END END AS orch_part')
    assert text.count("pg_catalog.sum(") == 2
    assert params == ["2", "c", "1", "b", "3", "d", "0", "a"]


def test_integer_points_cut_a_key_range_evenly() -> None:
    assert diff.integer_points(0, 100, 4) == [("25",), ("50",), ("75",)]
    assert diff.integer_points(10, 13, 8) == [("11",), ("12",)]
    assert diff.integer_points(5, 6, 8) == []
    assert diff.integer_points(-10, 10, 2) == [("0",)]


def test_fetch_query_aliases_outputs_so_order_by_sorts_real_keys() -> None:
    where, _ = diff.keys_predicate(_plan(), "blue", [("1",), ("2",)])
    text = diff.fetch_query(_plan(), "blue", where, limit=None, lock=True).as_string(None)
    assert 'AS "orch_c0"' in text
    assert text.endswith('ORDER BY "a" FOR SHARE')
    assert '"a" IN (%s, %s)' in text


def _row(key: str, terms: tuple[int, ...], values: tuple[str | None, ...]) -> FetchedRow:
    return FetchedRow((key,), terms, values)


def test_diff_rows_names_missing_extra_and_changed_columns() -> None:
    plan = _plan()
    blue: dict[diff.Key, FetchedRow] = {("1",): _row("1", (1, 2, 3), ("1", "x", "")),
            ("2",): _row("2", (4, 5, 6), ("2", "y", "z")),
            ("3",): _row("3", (7, 8, 9), ("3", "q", None))}
    green: dict[diff.Key, FetchedRow] = {("1",): _row("1", (1, 2, 30), ("1", "x", None)),
             ("3",): _row("3", (7, 8, 9), ("3", "q", None)),
             ("10",): _row("10", (0, 0, 0), ("10", "n", "n"))}
    out = diff.diff_rows(plan, blue, green)
    assert [(d.key, d.kind) for d in out] == [
        ({"a": "1"}, "changed"), ({"a": "2"}, "missing_on_green"),
        ({"a": "10"}, "extra_on_green")]
    assert out[0].changes == {"v": ("", None)}
    assert out[1].row == {"a": "2", "b": "y", "v": "z"}


def test_null_and_empty_string_read_differently() -> None:
    d = RowDiff({"id": "7"}, "changed", {"note": ("", None)})
    assert describe_diff(d) == "note: blue '', green NULL"
    assert json.loads(json.dumps(d.as_dict()))["changes"]["note"] == {"blue": "", "green": None}


def test_key_sort_orders_numbers_numerically() -> None:
    keys = [("10",), ("9",), ("b",), ("a",), ("-1",)]
    assert sorted(keys, key=diff.key_sort) == [("-1",), ("9",), ("10",), ("a",), ("b",)]


def _cols(*spec: tuple[str, str, bool]) -> list[ColumnInfo]:
    return [ColumnInfo(n, t, t, nn, False) for n, t, nn in spec]


def test_pair_columns_mapping_ignore_and_findings() -> None:
    blue = _cols(("id", "int8", True), ("amount", "int4", True), ("old", "text", False),
                 ("gone", "text", False), ("x", "int4", True))
    green = _cols(("id", "int8", True), ("amount_cents", "int4", True), ("old", "text", False),
                  ("x", "int8", False), ("added", "text", False))
    pairs, green_only, found = pair_columns(
        Q("public", "t"), blue, green, mapping={"amount_cents": "amount"}, ignore={"old"})
    assert [(p.blue, p.green) for p in pairs] == [("id", "id"), ("amount", "amount_cents"),
                                                 ("x", "x")]
    assert green_only == ["added"]
    x = pairs[2]
    assert x.base == "" and x.nullable  # types differ: text form; NOT NULL lost on green
    messages = {(f.severity, f.kind): f.message for f in found}
    assert "gone" in messages[("problem", "column")]
    assert "NOT NULL on public.t.x" in messages[("problem", "not_null")]
    assert "added" in messages[("note", "column")] or any(
        "added" in f.message for f in found if f.severity == "note")


def test_pair_columns_reports_a_bad_mapping() -> None:
    cols = _cols(("id", "int8", True))
    _, _, found = pair_columns(Q("public", "t"), cols, cols, mapping={"nope": "id"}, ignore=set())
    assert any(f.kind == "config" and "nope" in f.message for f in found)


def _gen(name: str, expression: str, *, virtual: bool = False) -> ColumnInfo:
    return ColumnInfo(name, "int4", "int4", False, True, virtual, expression)


def test_stored_generated_columns_are_compared_and_on_both_sides() -> None:
    # Regression: a generated column was skipped on blue, so its green namesake was
    # listed as "only on green", and its values were never compared.
    blue = [*_cols(("id", "int8", True), ("a", "int4", False)), _gen("g", "(a * 2)")]
    green = [*_cols(("id", "int8", True), ("a", "int4", False)), _gen("g", "(a * 2)")]
    pairs, green_only, found = pair_columns("public.t", blue, green, mapping={}, ignore=set())
    assert [p.blue for p in pairs] == ["id", "a", "g"]
    assert green_only == [] and found == []


def test_a_changed_generation_expression_is_reported() -> None:
    blue = [*_cols(("id", "int8", True)), _gen("g", "(a * 2)")]
    green = [*_cols(("id", "int8", True)), _gen("g", "(a * 3)")]
    pairs, _, found = pair_columns("public.t", blue, green, mapping={}, ignore=set())
    assert [p.blue for p in pairs] == ["id", "g"]  # its values are compared: rows differ
    assert [(f.severity, f.kind, f.object) for f in found] == [
        ("note", "generated", "public.t.g")]
    assert found[0].message == (
        "generation expression of public.t.g differs: blue '(a * 2)', green '(a * 3)'; its "
        "stored values are compared (a migration that changes it on purpose: list the column "
        "in validate.ignore_columns)")
    # an intended change (a migration), declared: a note, values not compared
    pairs, green_only, found = pair_columns("public.t", blue, green, mapping={}, ignore={"g"})
    assert [p.blue for p in pairs] == ["id"] and green_only == []
    assert [(f.severity, f.kind) for f in found] == [("note", "generated")]
    assert "values not compared (in validate.ignore_columns)" in found[0].message


def test_expression_layout_is_not_a_difference() -> None:
    case = "(COALESCE(a, 0) +\nCASE\n    WHEN (b IS NULL) THEN 1\n    ELSE 2\nEND)"
    blue = [_gen("g", case)]
    green = [_gen("g", case.replace("\n    ", " ").replace("\n", " "))]
    assert pair_columns("public.t", blue, green, mapping={}, ignore=set())[2] == []
    # ... but whitespace inside a literal is data
    _, _, found = pair_columns("public.t", [_gen("g", "(b || 'x  y'::text)")],
                               [_gen("g", "(b || 'x y'::text)")], mapping={}, ignore=set())
    assert len(found) == 1


def test_virtual_generated_columns_compare_expressions_not_values() -> None:
    blue = [*_cols(("id", "int8", True)), _gen("v", "(a * 2)", virtual=True)]
    same = [*_cols(("id", "int8", True)), _gen("v", "(a * 2)", virtual=True)]
    pairs, green_only, found = pair_columns("public.t", blue, same, mapping={}, ignore=set())
    assert [p.blue for p in pairs] == ["id"] and green_only == [] and found == []
    changed = [*_cols(("id", "int8", True)), _gen("v", "(a * 3)", virtual=True)]
    _, _, found = pair_columns("public.t", blue, changed, mapping={}, ignore=set())
    # nothing else would catch it: its values are not compared
    assert [(f.severity, f.kind) for f in found] == [("problem", "generated")]
    assert "computed on read and not compared" in found[0].message


def test_generated_on_one_side_only_names_the_side() -> None:
    blue = _cols(("id", "int8", True), ("g", "int4", False))
    green = [*_cols(("id", "int8", True)), _gen("g", "(id * 2)")]
    pairs, green_only, found = pair_columns("public.t", blue, green, mapping={}, ignore=set())
    assert [p.blue for p in pairs] == ["id", "g"] and green_only == []
    assert [f.message for f in found] == [
        "public.t.g is not generated on blue, stored generated on green; its stored values "
        "are compared"]
    _, _, found = pair_columns("public.t", green, blue, mapping={}, ignore=set())
    assert [f.message for f in found] == [
        "public.t.g is stored generated on blue, not generated on green; its stored values "
        "are compared"]


def test_checksum_sql_for_the_plan_command() -> None:
    text = checksum_sql(Q("public", "t"), ["id", "v"], True).as_string(None)
    assert text.startswith("SELECT count(*), pg_catalog.sum(")
    assert 'FROM "public"."t"' in text
    assert checksum_sql(Q("public", "t"), ["id"], False).as_string(None) == \
        'SELECT count(*) FROM "public"."t"'


def test_render_text_shows_tables_keys_and_verdicts() -> None:
    bad = TableResult("public.acc", 10, 9, chunks=2,
                      diffs=[RowDiff({"id": "5"}, "missing_on_green", row={"id": "5"}),
                             RowDiff({"id": "7"}, "changed", {"note": (None, "")})])
    good = TableResult("public.ok", 3, 3, chunks=1)
    report = ValidationReport(tables=[bad, good], problems=["public.acc: 2 differing row(s)"],
                              notes=["a note"])
    text = render_text(report)
    assert "public.acc" in text and "DIFFERS" in text
    assert "id=5" in text and "missing on green" in text
    assert "note: blue NULL, green ''" in text
    assert "FAILED" in text
    data = json.loads(json.dumps(report.as_dict()))
    assert data["ok"] is False
    assert data["tables"][0]["diffs"][0] == {"key": {"id": "5"}, "kind": "missing_on_green",
                                             "row": {"id": "5"}}


def test_config_defaults_are_sane() -> None:
    cfg = ValidateConfig()
    assert cfg.leaf_rows < cfg.chunk_rows
    assert cfg.split_factor >= 2 and cfg.recheck_rounds >= 1
