"""Green's post-data section: taken off before the initial copy, rebuilt after it.

Loading rows into a table that already has its indexes costs several times more
than loading a bare heap and building each index once with a sort, and foreign keys
cannot be checked row by row cheaper than in one join afterwards. pg_restore knows
this (its post-data section), but orchestrate cannot use blue's dump for it: the
``migrate`` state runs the release's migrations on green between provisioning and
the copy, so the indexes and constraints green must end with are green's own
(a migration may have added, dropped or renamed some). They are therefore read
from green's catalog right before the copy (``pg_get_indexdef`` /
``pg_get_constraintdef`` of the same server that will run them again), written to
a table in orchestrate's schema on green and dropped, all in one transaction; after
the copy ``restore_post_data`` runs them again, several sessions at once.

Every step can be repeated after a crash: an object counts as restored when it
exists in green's catalog (a non-concurrent CREATE INDEX or ALTER TABLE commits
whole or not at all), so a rerun builds only what is missing, and the recorded
definitions are deleted only when everything is back.

What is taken off, on the copied (non-partitioned) tables:
- plain indexes (rebuilt in parallel, largest table first);
- primary-key and unique constraints: their index is built like a plain one (so
  several indexes of one table build at once, CREATE INDEX only takes a SHARE lock)
  and then attached with ``ADD CONSTRAINT .. USING INDEX``;
- exclusion constraints (re-added as they were);
- foreign keys from or to a copied table: re-added NOT VALID and then validated, so
  a validation holds only SHARE UPDATE EXCLUSIVE and several run at once.
Kept in place: CHECK and NOT NULL constraints (checked per row, cheap), triggers
(the copy runs with session_replication_role = replica, so they do not fire, as in
logical replication's apply), and anything of a partitioned table, whose index tree
(ON ONLY + ATTACH PARTITION) is not worth re-creating here.

The work is split by job: ``post_data`` (the recorded objects and their table),
``post_data_defer`` (reading green's catalog, recording and dropping) and
``post_data_restore`` (running the records again in parallel). This module keeps
the names callers use.
"""

from orchestrator.pg.post_data import (
    STEP_ATTACH,
    STEP_BUILD,
    STEP_FOREIGN_KEYS,
    Deferred,
    done_ids,
    ensure_table,
    pending,
)
from orchestrator.pg.post_data_defer import DeferReport, defer_post_data
from orchestrator.pg.post_data_restore import (
    PostDataStats,
    Progress,
    restore_post_data,
    run_item,
    session,
)

__all__ = [
    "STEP_ATTACH",
    "STEP_BUILD",
    "STEP_FOREIGN_KEYS",
    "DeferReport",
    "Deferred",
    "PostDataStats",
    "Progress",
    "defer_post_data",
    "done_ids",
    "ensure_table",
    "pending",
    "restore_post_data",
    "run_item",
    "session",
]
