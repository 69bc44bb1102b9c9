"""The release record reads what earlier versions stored and writes it back unchanged."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator import machine
from orchestrator.record import Facts, RecordError, State, Status
from orchestrator.routers.base import Weights
from orchestrator.store import ReleaseRow


def _jsonb_order(keys: list[str]) -> list[str]:
    # PostgreSQL's jsonb keeps object keys shorter first, then bytewise.
    return sorted(keys, key=lambda k: (len(k.encode()), k.encode()))


# Every fact the release writes (collected from `_fact(`, `merge_facts(` and
# `facts.get(` / `facts[` in machine.py before the typed record), with the values the
# producers give them, as psycopg hands back a `releases.facts` jsonb column: keys in
# jsonb order, numbers as json.loads reads them.
STORED: dict[str, Any] = {
    "mode": "bidirectional",
    "sync": {
        "copy": {"bytes": 81920, "jobs": 4, "rows": 1200, "tasks": 6, "tables": 3,
                 "seconds": 0.84, "skipped": None, "restarted": False, "streaming": False,
                 "split_tables": 1, "text_tables": 0, "copy_seconds": 0.61,
                 "binary_tables": 3, "consistent_point": "0/1A2B3C4",
                 "post_data": {"indexes": 2, "seconds": 0.12}},
        "method": "parallel-copy", "copy_s": 0.61, "total_s": 1.02, "catchup_s": 0.05,
        "warnings": ["table public.log has no primary key"],
        "post_data_s": 0.12,
    },
    "stage": 2,
    "backup": {"path": "/var/backups/orchestrate/shop-r1.dump", "bytes": 24576,
               "format": "custom", "sha256": "9f2c" + "0" * 60, "seconds": 0.42,
               "toc_entries": 17, "tables_with_data": 3},
    "majors": {"blue": 16, "green": 17},
    "weights": {"blue": 80, "green": 20},
    "migrations": ["0001_init.sql", "0002_add_email.sql"],
    "validation": {"ok": True, "notes": [], "tables": [
        {"ok": True, "error": None, "table": "public.users", "chunks": 4, "method": "checksum",
         "seconds": 0.031, "blue_rows": 1000, "green_rows": 1000, "complete": True}],
        "seconds": 0.05, "findings": [], "matviews": [], "problems": [],
        "sequences": [{"name": "public.users_id_seq", "blue": 1000, "green": 1000}],
        "under_writes": True},
    "blue_fenced": False,
    "promoted_at": 1717171717.1234567,
    "rollback_from": "window",
    "switched_over": True,
    "green_writable": True,
    "rolled_back_at": 1717171999.9876543,
    "weights_target": {"blue": 0, "green": 100},
    "forward_dropped": True,
    "rollback_reason": "window failed: green probe failed",
    "blue_fingerprint": {"public.users": "a1b2c3d4", "public.orders": "e5f6a7b8"},
    "awaiting_approval": None,
    "matviews_refreshed": [{"mode": "plain", "matview": "public.daily", "seconds": 0.004}],
    "switchover_pause_s": 0.213,
}


def test_the_fixture_is_in_jsonb_key_order() -> None:
    assert list(STORED) == _jsonb_order(list(STORED))


def test_facts_stored_by_the_current_version_round_trip_unchanged() -> None:
    stored = copy.deepcopy(STORED)
    facts = Facts.from_storage(stored)
    out = facts.for_storage()
    assert out == STORED
    # Same text too: key order (printed by `status --output json`) and number forms.
    assert json.dumps(out) == json.dumps(STORED)
    assert json.dumps(out["backup"]) == json.dumps(STORED["backup"])
    assert facts.extra == {}
    assert stored == STORED  # loading does not touch what it read


def test_facts_read_as_types() -> None:
    facts = Facts.from_storage(STORED)
    assert facts.mode == "bidirectional"
    assert facts.weights == Weights(blue=80, green=20)
    assert facts.weights_target == Weights.green_at(100)
    assert facts.rollback_from is State.WINDOW
    assert facts.backup is not None and facts.backup.tables_with_data == 3
    assert facts.stage == 2 and facts.awaiting_approval is None
    assert facts.promoted_at == 1717171717.1234567


def test_unset_facts_are_not_written() -> None:
    # A fresh release's row: only what preflight recorded. "green_writable" must stay
    # absent (tests and older versions test for the key, not its value).
    stored = {"mode": "switchover", "majors": {"blue": 15, "green": 17}}
    facts = Facts.from_storage(stored)
    assert facts.for_storage() == stored
    assert not facts.green_writable and facts.stage == 0 and facts.weights is None
    assert Facts().for_storage() == {}


def test_an_older_row_without_later_facts_reads() -> None:
    # Before `blue_fenced` existed a switchover recorded only `switched_over`.
    stored = {"mode": "switchover", "stage": 1, "switched_over": True,
              "green_writable": True, "forward_dropped": True}
    facts = Facts.from_storage(stored)
    assert facts.switched_over and not facts.blue_fenced
    assert facts.for_storage() == stored


def test_a_patch_holds_only_the_facts_given_null_included() -> None:
    patch = Facts(stage=3, awaiting_approval=None, weights=Weights.green_at(50))
    assert patch.for_storage() == {"stage": 3, "awaiting_approval": None,
                                   "weights": {"blue": 50, "green": 50}}
    assert Facts(rollback_from=State.CANARY).for_storage() == {"rollback_from": "canary"}


def test_unknown_facts_are_kept_and_written_back_in_place() -> None:
    stored = {"mode": "switchover", "zz_future": {"a": [1, 2]}, "stage": 1,
              "backup": {**STORED["backup"], "compression": "zstd"}}
    facts = Facts.from_storage(stored)
    assert facts.extra == {"zz_future": {"a": [1, 2]}}
    out = facts.for_storage()
    assert json.dumps(out) == json.dumps(stored)


def test_a_known_fact_of_the_wrong_type_is_refused_with_a_hint() -> None:
    with pytest.raises(RecordError) as err:
        Facts.from_storage({"mode": "sideways", "stage": "two"}, release="shop-r1")
    assert "release shop-r1" in err.value.message
    assert "mode" in err.value.message and "stage" in err.value.message
    assert err.value.hint


def test_a_misspelt_fact_is_an_error_when_written() -> None:
    with pytest.raises(ValidationError):
        Facts.model_validate({"green_writeable": True})


def test_a_row_parses_state_status_and_facts() -> None:
    row = ReleaseRow.from_storage({
        "name": "shop-r1", "state": "canary", "status": "running", "config_sha256": "x",
        "facts": {"stage": 1}, "owner": None, "error": None, "rollback_requested": None,
        "approved_stage": None, "started_at": None, "updated_at": None,
        "finished_at": None})
    assert row.state is State.CANARY and row.status is Status.RUNNING
    assert row.facts.stage == 1


def test_a_row_in_an_unknown_state_is_refused_with_a_hint() -> None:
    with pytest.raises(RecordError) as err:
        ReleaseRow.from_storage({"name": "shop-r1", "state": "teleport", "status": "running",
                                 "config_sha256": "x", "facts": {}})
    assert "'teleport'" in err.value.message and err.value.hint


def test_state_is_still_importable_from_the_machine() -> None:
    assert machine.State is State and State.WINDOW in machine.AFTER_PROMOTION
    assert State.DONE in machine.TERMINAL
