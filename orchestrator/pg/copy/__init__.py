"""Green's initial load: a snapshot-consistent parallel copy, then streaming from the slot.

Logical replication's own initial sync (``copy_data = true``) copies each table in
one worker into tables that already carry every index, and cannot split a table.
orchestrate does the copy itself instead, the way pg_dump and pgcopydb take a
consistent picture of a live database, and lets logical replication stream from
exactly the point that picture shows:

1. On blue, a replication connection creates the forward slot with an exported
   snapshot (``CREATE_REPLICATION_SLOT .. LOGICAL pgoutput (SNAPSHOT 'export')``, the
   older ``EXPORT_SNAPSHOT`` spelling before 15). The snapshot shows exactly the
   transactions committed before the slot's consistent point; the slot streams
   exactly the ones committed after it. The connection stays open and idle until
   the last copy is done: an exported snapshot can only be imported while its
   exporting session is unchanged.
2. Green's indexes, key constraints and foreign keys are recorded and dropped
   (``schema_sections``), read from green's own catalog because the release's
   migrations ran on green after provisioning.
3. ``jobs`` slots run a dependency graph: copy pipes and green sessions that rebuild
   what step 2 dropped. A table's indexes are built as soon as its rows are in, while
   other tables are still copying; a foreign key is checked once both of its tables
   are indexed; ANALYZE comes last per table. The longest chain of remaining work
   goes first, so the largest table's copy starts at once and its index right after.
4. The subscription is created on the existing slot (``copy_data = false,
   create_slot = false``) and the heartbeat catch-up (``replication.wait_applied``)
   proves green current: "caught up and indexed".

A copy pipe is ``psql`` on blue (``BEGIN ISOLATION LEVEL REPEATABLE READ; SET
TRANSACTION SNAPSHOT ..; COPY .. TO STDOUT``) into ``psql`` on green (``\\copy ..
FROM pstdin``). The rows never pass through Python: a psycopg copy loop costs a
Python call per row under the GIL (measured 1.9-4.6 s per million pgbench rows
against 1.3-2.0 s for the psql pipe). Green's transaction commits only after blue's
side exited successfully: COPY takes end-of-input at a row boundary as a normal
end, so a blue failure mid-stream must not commit a prefix. Green's copy sessions
run with ``session_replication_role = replica`` (triggers do not fire, as in
logical replication's apply) and ``synchronous_commit = off``.

Binary COPY is used for a table when every copied column has a built-in type (OID
below 16384, the same on every major) with binary send/receive functions, and the
same type on both sides; other tables (enums, domains, extension types, arrays of
those, a type a migration changed) use text, the portable format.

A table copied whole by one pipe is truncated and filled in one transaction with
``COPY .. FREEZE``: rows are written frozen and all-visible, so the index builds,
foreign-key checks and ANALYZE that follow do not set hint bits page by page, and
no anti-wraparound VACUUM rewrites the table later. A large table can instead be
split into ranges of heap pages (``ctid >= '(a,0)' AND ctid < '(b,0)'``, a TID range
scan, blue 14+) copied in parallel: the pages a snapshot sees are fixed, the split
needs no index, every range reads sequentially and ranges of equal size take equal
time (key ranges from a skewed or uncorrelated key do not). Splitting gives up
FREEZE, so ``plan_copy`` splits only where that at least halves the copy's makespan
(``SPLIT_GAIN``). Leaf partitions of a partitioned table are separate tasks.

WAL: green runs with ``wal_level = logical`` (it publishes the reverse direction
later), so the ``wal_level = minimal`` shortcut that skips WAL for a COPY into a
table created or truncated in the same transaction does not apply; every copied
page is WAL-logged. Unlogged tables switched to LOGGED afterwards would write the
whole table to WAL anyway (and lose everything on a crash in between), so the copy
simply writes WAL, in multi-insert records; checkpoint spacing (``max_wal_size``)
decides whether that WAL is cheap.

Resuming: an exported snapshot dies with its session, so a copy interrupted half way
cannot be continued consistently. Green keeps one row per slot in
``<control_schema>.initial_copy``: ``copying`` is written before the slot is created,
``copied`` when the last row is in, ``streaming`` with the subscription. A run that
finds ``copying`` (or ``copied`` without the slot on blue) ends the copy sessions a
dead run may have left, drops the slot, truncates green's copied tables and starts
over; ``copied`` keeps the copy and the slot and only finishes the rebuilds
(``restore_post_data``); ``streaming`` has nothing left to do.

The plain path (``method: subscription``) remains: logical replication copies the
tables itself, with more sync workers for the run (``tune_sync_workers``),
``binary`` when both majors are 16+ and ``streaming = parallel`` on 16+.

The package is split by job: ``plan`` (what to copy, in which chunks), ``graph`` (the
copies, rebuilds and ANALYZEs with their order, run by ``orchestrator.pg.scheduler``,
which the post-data restore shares), ``pipes`` (the psql pipe
transport and its stall watchdog), ``slot`` (the exported snapshot), ``state`` (the
progress kept for a rerun), ``subscribe`` (the subscription and the plain path's
tuning) and ``sync`` (the driver). This module is its face; so is
``orchestrator.pg.initial_copy``.
"""

from __future__ import annotations

from orchestrator.pg.copy.pipes import (
    Copier,
)
from orchestrator.pg.copy.plan import (
    FIRST_NORMAL_OID,
    SPLIT_GAIN,
    CopyPlan,
    CopyTask,
    cores,
    default_chunk_bytes,
    effective_jobs,
    lpt_makespan,
    parallel_maintenance_workers,
    plan_copy,
    split_pages,
)
from orchestrator.pg.copy.slot import (
    ExportedSlot,
    exported_slot,
)
from orchestrator.pg.copy.state import (
    COPY_APP_PREFIX,
    STATE_TABLE,
    CopyState,
    copy_state,
    ensure_state_tables,
)
from orchestrator.pg.copy.subscribe import (
    SETTINGS_TABLE,
    TuneResult,
    restore_sync_settings,
    streaming_options,
    subscribe_from_slot,
    tune_sync_workers,
)
from orchestrator.pg.copy.sync import (
    CopyStats,
    Progress,
    SyncReport,
    copy_initial,
    initial_sync,
    restore_post_data,
)

__all__ = [
    "COPY_APP_PREFIX",
    "FIRST_NORMAL_OID",
    "SETTINGS_TABLE",
    "SPLIT_GAIN",
    "STATE_TABLE",
    "Copier",
    "CopyPlan",
    "CopyState",
    "CopyStats",
    "CopyTask",
    "ExportedSlot",
    "Progress",
    "SyncReport",
    "TuneResult",
    "copy_initial",
    "copy_state",
    "cores",
    "default_chunk_bytes",
    "effective_jobs",
    "ensure_state_tables",
    "exported_slot",
    "initial_sync",
    "lpt_makespan",
    "parallel_maintenance_workers",
    "plan_copy",
    "restore_post_data",
    "restore_sync_settings",
    "split_pages",
    "streaming_options",
    "subscribe_from_slot",
    "tune_sync_workers",
]
